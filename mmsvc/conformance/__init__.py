"""Conformance tooling: run mmsvc traces on the host Linux kernel (the oracle).

`kernel_runner.run_trace(trace)` returns the result document of trace-format.md with
`"runner": "kernel"`; `python -m mmsvc.conformance.kernel_runner TRACE.json` prints it.
See docs/conformance.md for how it works and what it does not support.
"""
