"""Transport security of the server, and secret-free store URLs.

:class:`ServerSecurity` is what ``mmsvc serve`` was given: a server certificate and key (TLS),
optionally a CA for client certificates (mutual TLS: tenants are the client certificates'
subject CN) and optionally a file of bearer tokens (tenants by token, over TLS).  Without a
certificate the server listens in plaintext with a single, implicit tenant, as before.

The Redis URL of the page store may hold a password (``redis://user:password@host:port/db``);
:func:`redact_url` is the only form of it that may be logged or shown, and
:func:`url_with_password` adds a password that was passed separately (environment variable or
file), so that it never has to be on a command line.  docs/security.md is the user's guide.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import grpc

if TYPE_CHECKING:
    from mmsvc.server.tenancy import TenantResolver

ENV_TLS_CERT = "MMSVC_TLS_CERT"
ENV_TLS_KEY = "MMSVC_TLS_KEY"
ENV_TLS_CLIENT_CA = "MMSVC_TLS_CLIENT_CA"
ENV_TENANT_TOKENS = "MMSVC_TENANT_TOKENS"
ENV_REDIS_URL = "MMSVC_REDIS_URL"
ENV_REDIS_PASSWORD = "MMSVC_REDIS_PASSWORD"

REDACTED = "***"
#: Query parameters of a store URL whose values are never shown (lower case, substrings).
SECRET_QUERY_WORDS = ("password", "passwd", "secret", "token")


class SecurityError(ValueError):
    """The security configuration is incomplete, inconsistent or unreadable."""


def read_file(path: str, what: str) -> bytes:
    """The bytes of ``path``; a :class:`SecurityError` naming ``what`` when unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class ServerSecurity:
    """TLS, mutual TLS and tenant identity of one server (every worker gets the same).

    * ``cert_file`` + ``key_file``: PEM server certificate chain and unencrypted private key →
      TLS on every listening address (shared and private ports alike).
    * ``client_ca_file``: PEM CA bundle; clients must present a certificate it signed
      (mutual TLS) and the tenant of a call is that certificate's subject CN.
    * ``tenant_tokens_file``: ``TENANT TOKEN`` lines; the tenant of a call is the one whose
      token the call carries (``authorization: Bearer TOKEN``).  Needs TLS; with mutual TLS too,
      the token decides the tenant and the certificate only admits the connection.
    """

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    tenant_tokens_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise SecurityError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.tenant_tokens_file is not None and self.cert_file is None:
            raise SecurityError(
                "--tenant-tokens needs TLS (--tls-cert, --tls-key): bearer tokens are never "
                "accepted over plaintext"
            )

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca_file is not None

    @property
    def tenant_source(self) -> str | None:
        """``"token"``, ``"certificate"``, or None (one implicit tenant)."""
        if self.tenant_tokens_file is not None:
            return "token"
        if self.client_ca_file is not None:
            return "certificate"
        return None

    @property
    def mode(self) -> str:
        """``"plaintext"``, ``"tls"`` or ``"mtls"`` (for logs)."""
        return "mtls" if self.mutual_tls else "tls" if self.tls else "plaintext"

    def check_files(self) -> None:
        """Fail early, with a readable message, on files gRPC would only reject as "failed to
        bind": unreadable files, a key that does not match the certificate, an encrypted key,
        a CA bundle without certificates; and on a malformed tenant tokens file."""
        if self.cert_file is None or self.key_file is None:
            return
        if self.tenant_tokens_file is not None:
            self.tenant_resolver()  # parses the file
        read_file(self.cert_file, "TLS certificate")
        read_file(self.key_file, "TLS key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

        def no_password() -> bytes:
            raise SecurityError(f"the TLS key {self.key_file!r} is encrypted: give it unencrypted")

        try:
            ctx.load_cert_chain(self.cert_file, self.key_file, password=no_password)
        except ssl.SSLError as e:
            raise SecurityError(
                f"the TLS certificate {self.cert_file!r} and key {self.key_file!r} do not form "
                f"a valid pair: {e.reason or e}"
            ) from None
        if self.client_ca_file is not None:
            read_file(self.client_ca_file, "client CA bundle")
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except ssl.SSLError as e:
                raise SecurityError(
                    f"the client CA bundle {self.client_ca_file!r} is not valid PEM: "
                    f"{e.reason or e}"
                ) from None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """gRPC credentials for the listening ports (None: plaintext)."""
        if self.cert_file is None or self.key_file is None:
            return None
        self.check_files()
        cert = read_file(self.cert_file, "TLS certificate")
        key = read_file(self.key_file, "TLS key")
        client_ca = (
            read_file(self.client_ca_file, "client CA bundle")
            if self.client_ca_file is not None
            else None
        )
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def tenant_resolver(self) -> TenantResolver | None:
        """How the tenant of a call is found (None: one implicit tenant, no checks)."""
        from mmsvc.server.tenancy import CertificateTenants, TokenTenants

        if self.tenant_tokens_file is not None:
            return TokenTenants.from_file(self.tenant_tokens_file)
        if self.client_ca_file is not None:
            return CertificateTenants()
        return None


# -- store URLs ---------------------------------------------------------------------------------


def _split_userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """``user:password@host:port`` → (user, password, host:port); None where absent."""
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), hostport


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret-looking query value) replaced by ``***``.

    The user name, host, port, database and TLS options stay (they help diagnose a connection
    problem and are not secrets).  A password that was not percent-encoded (a ``/``, ``?``,
    ``#`` or ``@`` in it) is still hidden: the user info is taken up to the *last* ``@``, which
    at worst hides more than the password.  Anything that does not parse is redacted whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return REDACTED
    userinfo, at, tail = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        prefix = f"{user}:{REDACTED}@" if colon else f"{user}@"
    else:
        prefix, tail = "", rest
    try:
        parts = urlsplit(f"{scheme}://{tail}")
    except ValueError:
        return REDACTED
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [
                (k, REDACTED if any(w in k.lower() for w in SECRET_QUERY_WORDS) else v)
                for k, v in pairs
            ],
            safe="/*",
        )
    return urlunsplit((parts.scheme, prefix + parts.netloc, parts.path, query, parts.fragment))


def url_password(url: str) -> str | None:
    """The (still percent-encoded) password of ``url``, or None (parsed as redact_url does)."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    _, colon, password = userinfo.partition(":")
    return password if at and colon and password else None


def url_with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (percent-encoded) as its password; the user name stays.

    For a password handed over outside the URL (``MMSVC_REDIS_PASSWORD``,
    ``--redis-password-file``).  A URL that already has a password is refused: two sources
    of one secret is a configuration mistake.
    """
    if url_password(url) is not None:
        raise SecurityError("the Redis URL already has a password; give it in one place only")
    parts = urlsplit(url)
    user, _, hostport = _split_userinfo(parts.netloc)
    netloc = f"{user or ''}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
