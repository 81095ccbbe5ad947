"""Settings shared by the asyncio and the blocking client."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mmsvc.mm.types import PAGE_SIZE
from mmsvc.server.validate import MAX_VIEW_PAGES

#: Default deadline of every call, in seconds.
DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
#: PageFlags requests are split into chunks of this many bytes.
PAGE_FLAGS_CHUNK = MAX_VIEW_PAGES * PAGE_SIZE


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of idempotent calls (views, Drain, Ping, Check, GetMachine, ListMachines).

    Only UNAVAILABLE is retried (the server was not reached or restarted); ``attempts`` counts
    the first call.  Backoff is exponential with full jitter.
    """

    attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def backoff(self, attempt: int) -> float:
        """Sleep before retry number ``attempt`` (1-based)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(0, cap)


NO_RETRY = RetryPolicy(attempts=1)

ENV_TLS_CA = "MMSVC_TLS_CA"
ENV_TLS_CLIENT_CERT = "MMSVC_TLS_CLIENT_CERT"
ENV_TLS_CLIENT_KEY = "MMSVC_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "MMSVC_TLS_SERVER_NAME"
ENV_TOKEN = "MMSVC_TOKEN"
ENV_TOKEN_FILE = "MMSVC_TOKEN_FILE"

PemSource = str | os.PathLike[str] | bytes


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes: ``bytes`` are the PEM itself, a str or path names a file."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class TLSOptions:
    """Transport security of a client channel (docs/security.md).

    * ``ca``: the CA bundle that signed the server's certificate (None: gRPC's default roots);
    * ``cert`` + ``key``: this client's certificate chain and private key, for a server that
      requires mutual TLS (the certificate's subject CN is the client's tenant);
    * ``server_name``: the name to check in the server's certificate when it differs from the
      target's host (e.g. connecting to an IP address with a certificate for a DNS name).

    Each of ``ca``, ``cert``, ``key`` is a file path or the PEM bytes themselves.
    """

    ca: PemSource | None = None
    cert: PemSource | None = None
    key: PemSource | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSOptions | None:
        """From ``MMSVC_TLS_CA``, ``MMSVC_TLS_CLIENT_CERT``, ``MMSVC_TLS_CLIENT_KEY``,
        ``MMSVC_TLS_SERVER_NAME``; None when none of them is set."""
        env = os.environ if environ is None else environ
        values = [env.get(k) or None for k in
                  (ENV_TLS_CA, ENV_TLS_CLIENT_CERT, ENV_TLS_CLIENT_KEY, ENV_TLS_SERVER_NAME)]
        if not any(values):
            return None
        ca, cert, key, name = values
        return cls(ca=ca, cert=cert, key=key, server_name=name)

    def channel_credentials(self, token: str | None = None) -> grpc.ChannelCredentials:
        """SSL credentials, plus ``authorization: Bearer <token>`` on every call if given."""
        creds = grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.access_token_call_credentials(token)
            )
        return creds

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token of ``MMSVC_TOKEN``, or the first line of the file ``MMSVC_TOKEN_FILE``."""
    env = os.environ if environ is None else environ
    token = env.get(ENV_TOKEN)
    if token:
        return token.strip()
    path = env.get(ENV_TOKEN_FILE)
    if path:
        return read_token_file(path)
    return None


def read_token_file(path: str | os.PathLike[str]) -> str:
    """A bearer token kept in a file (its first non-empty line)."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"no token in {os.fspath(path)!r}")


def channel_settings(
    tls: TLSOptions | None, token: str | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """(credentials or None for plaintext, channel options) of a client's own channel."""
    if token is not None and tls is None:
        raise ValueError("a bearer token is only sent over TLS: pass tls=TLSOptions(...)")
    if tls is None:
        return None, list(CHANNEL_OPTIONS)
    return tls.channel_credentials(token), [*CHANNEL_OPTIONS, *tls.channel_options()]


def page_chunks(addr: int, length: int) -> list[tuple[int, int]]:
    """Split ``[addr, addr+length)`` into PageFlags-sized pieces."""
    if length <= PAGE_FLAGS_CHUNK:
        return [(addr, length)]
    out = []
    off = 0
    while off < length:
        n = min(PAGE_FLAGS_CHUNK, length - off)
        out.append((addr + off, n))
        off += n
    return out
