"""Concurrency invariant tests: real multi-worker servers, Redis and gRPC.

See docs/concurrency.md.
"""
