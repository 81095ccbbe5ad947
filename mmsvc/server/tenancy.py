"""Per-tenant access: who a call comes from, and which machines it may see.

With mutual TLS (or bearer tokens) every call has a *tenant*: the subject CN of the client
certificate (:class:`CertificateTenants`) or the tenant of its token (:class:`TokenTenants`).
A machine belongs to the tenant that created it, for good:

* the owner is stored with the machine, in Redis under the machine's own hash tag
  (``{m<id>}:tenant``, removed with the machine's other keys), and each tenant's machines in a
  set (``{mmsvc}:tenant:<tenant>:machines``) for ``ListMachines``;
* every call that names a machine is admitted only when the caller owns it; otherwise it fails
  exactly as for a machine that does not exist (ESRCH, ``no machine '<id>'``), so a tenant
  cannot tell another tenant's machine from a free id.  Processes, files, pages and batches
  live inside machines, so the machine check covers them;
* owners are cached per worker (a machine never changes owner): a call on the caller's own
  machine costs no store access; any other id costs one read, the same whether the machine
  belongs to someone else or does not exist.

Without a tenant source (plaintext or plain TLS) there is a single implicit tenant and nothing
is checked or stored: the server behaves as it always did.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol

import grpc.aio
import redis.asyncio as aioredis
from google.protobuf.message import Message
from redis.asyncio.cluster import RedisCluster

from mmsvc.mm.errors import KernelError, esrch
from mmsvc.server import validate as v
from mmsvc.server.security import SecurityError, read_file
from mmsvc.store import keys

Ctx = grpc.aio.ServicerContext[Any, Any]

#: The tenant of the RPC being served (set when the call is admitted; read by the access log).
CURRENT_TENANT: ContextVar[str | None] = ContextVar("mmsvc_tenant", default=None)

MAX_TENANT_LEN = 128
MIN_TOKEN_LEN = 16
_PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")


class Unauthenticated(Exception):
    """The call carries no usable identity (no CN, no or an unknown token)."""


def valid_tenant(name: str) -> bool:
    """1..128 printable ASCII characters (it ends up in Redis keys and log lines)."""
    return 0 < len(name) <= MAX_TENANT_LEN and all(ch in _PRINTABLE for ch in name)


def no_machine(machine: str) -> KernelError:
    """The error of a machine the caller may not see: the kernel's own for a missing one
    (mmsvc.mm.machine), so that both look the same."""
    return esrch(f"no machine {machine!r}")


# -- who is calling ---------------------------------------------------------------------------


class TenantResolver(Protocol):
    source: str

    def tenant(self, context: Ctx) -> str | None:
        """The caller's tenant, or None when the call has no usable identity."""


class CertificateTenants:
    """Tenant = the subject CN of the verified client certificate (mutual TLS).

    gRPC verified the chain against the client CA before the call reached the server; the
    ``x509_common_name`` auth property is only ever set from that verified certificate.
    """

    source = "certificate"

    def tenant(self, context: Ctx) -> str | None:
        try:
            auth = context.auth_context()
        except Exception:  # pragma: no cover - a dead call
            return None
        names = list(auth.get("x509_common_name") or ())
        if len(names) != 1:
            return None
        try:
            name = names[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return name if valid_tenant(name) else None


class TokenTenants:
    """Tenant = the owner of the bearer token in the call's ``authorization`` metadata.

    Tokens are kept only as SHA-256 digests; a lookup compares digests, never the token.
    """

    source = "token"

    def __init__(self, tokens: Mapping[str, str]) -> None:
        """``tokens``: token → tenant."""
        self._by_digest: dict[bytes, str] = {}
        for token, tenant in tokens.items():
            if len(token) < MIN_TOKEN_LEN:
                raise SecurityError(
                    f"tenant {tenant!r}: tokens must have at least {MIN_TOKEN_LEN} characters"
                )
            if not valid_tenant(tenant):
                raise SecurityError(
                    f"bad tenant name {tenant!r}: 1..{MAX_TENANT_LEN} printable characters"
                )
            self._by_digest[_digest(token)] = tenant

    @classmethod
    def from_file(cls, path: str) -> TokenTenants:
        """``TENANT TOKEN`` per line; blank lines and ``#`` comments are skipped.

        A tenant may have several tokens (rotation); one token belongs to one tenant.
        """
        text = read_file(path, "tenant tokens file").decode("utf-8", errors="replace")
        tokens: dict[str, str] = {}
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2:
                # never echo the line: it holds a token
                raise SecurityError(f"{path}:{n}: expected 'TENANT TOKEN'")
            tenant, token = fields
            if tokens.get(token, tenant) != tenant:
                raise SecurityError(f"{path}:{n}: this token already belongs to another tenant")
            tokens[token] = tenant
        if not tokens:
            raise SecurityError(f"{path}: no tokens")
        return cls(tokens)

    @property
    def tenants(self) -> frozenset[str]:
        return frozenset(self._by_digest.values())

    def tenant(self, context: Ctx) -> str | None:
        for key, value in context.invocation_metadata() or ():
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return self._by_digest.get(_digest(token.strip()))
            return None
        return None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


# -- who owns what ----------------------------------------------------------------------------


class OwnershipStore(Protocol):
    async def owner(self, machine: str) -> str | None: ...

    async def claim(self, machine: str, tenant: str) -> None: ...

    async def release(self, machine: str, tenant: str) -> None: ...

    async def machines(self, tenant: str) -> set[str]: ...


def owner_key(machine: str) -> str:
    """The owner of a machine, under the machine's hash tag (deleted with the machine)."""
    return f"{keys.machine(machine)}:tenant"


def tenant_machines_key(tenant: str) -> str:
    return f"{{mmsvc}}:tenant:{tenant}:machines"


class RedisOwnership:
    """Ownership records in the page store (durable, shared by all workers).

    Single-key commands only, so ``client`` may be a ``redis.asyncio.Redis`` or a
    ``RedisCluster`` (every key has its own hash tag).
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    async def owner(self, machine: str) -> str | None:
        raw = await self.client.get(owner_key(machine))
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def claim(self, machine: str, tenant: str) -> None:
        # Machine ids are never reused, so NX only guards against a bug.
        fresh = await self.client.set(owner_key(machine), tenant, nx=True)
        if not fresh and await self.owner(machine) != tenant:
            raise RuntimeError(f"machine {machine!r} already has an owner")
        await self.client.sadd(tenant_machines_key(tenant), machine)

    async def release(self, machine: str, tenant: str) -> None:
        await self.client.srem(tenant_machines_key(tenant), machine)
        await self.client.delete(owner_key(machine))

    async def machines(self, tenant: str) -> set[str]:
        raw = await self.client.smembers(tenant_machines_key(tenant))
        return {x.decode() if isinstance(x, bytes) else str(x) for x in raw}


class MemoryOwnership:
    """Ownership in this process only: for kernels without a Redis store (tests)."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    async def owner(self, machine: str) -> str | None:
        return self._owner.get(machine)

    async def claim(self, machine: str, tenant: str) -> None:
        if self._owner.setdefault(machine, tenant) != tenant:
            raise RuntimeError(f"machine {machine!r} already has an owner")

    async def release(self, machine: str, tenant: str) -> None:
        if self._owner.get(machine) == tenant:
            del self._owner[machine]

    async def machines(self, tenant: str) -> set[str]:
        return {m for m, t in self._owner.items() if t == tenant}


def ownership_for(kernel: object) -> OwnershipStore:
    """Records in the kernel's own Redis store when it has one, in memory otherwise."""
    client = getattr(getattr(kernel, "store", None), "client", None)
    if isinstance(client, aioredis.Redis | RedisCluster):
        return RedisOwnership(client)
    return MemoryOwnership()


# -- the checks -------------------------------------------------------------------------------


class Tenancy:
    """The servicer's gate: :meth:`admit` every call, then :meth:`claim` / :meth:`release` /
    :meth:`visible` in CreateMachine / DeleteMachine / ListMachines."""

    def __init__(
        self, resolver: TenantResolver, ownership: OwnershipStore, cache_size: int = 1 << 16
    ) -> None:
        self.resolver = resolver
        self.ownership = ownership
        self.cache_size = cache_size
        self._owners: dict[str, str] = {}

    @property
    def source(self) -> str:
        return self.resolver.source

    async def admit(self, request: object, context: Ctx) -> str:
        """Authenticate the call and check that it may touch the machine it names.

        Raises :class:`Unauthenticated`, ``ValidationError`` (a malformed machine id, as the
        servicer would) or the ESRCH :class:`KernelError` of a machine the caller does not own.
        """
        tenant = self.resolver.tenant(context)
        if tenant is None:
            raise Unauthenticated(
                "a client certificate with a subject CN is required"
                if self.resolver.source == "certificate"
                else "a valid bearer token is required"
            )
        CURRENT_TENANT.set(tenant)
        if isinstance(request, Message) and "machine" in request.DESCRIPTOR.fields_by_name:
            machine = getattr(request, "machine", "")
            v.machine_id(machine)
            await self.check(tenant, machine)
        return tenant

    async def check(self, tenant: str, machine: str) -> None:
        if self._owners.get(machine) == tenant:
            return
        # Anything but the caller's own known machine costs one store read, so that another
        # tenant's machine takes as long to refuse as a missing one.
        owner = await self.ownership.owner(machine)
        if owner != tenant:
            raise no_machine(machine)
        self._remember(machine, owner)

    async def claim(self, machine: str) -> None:
        """Record the current tenant as the owner of the machine it just created."""
        tenant = self._current()
        await self.ownership.claim(machine, tenant)
        self._remember(machine, tenant)

    async def release(self, machine: str) -> None:
        """Forget a machine the current tenant deleted."""
        tenant = self._current()
        self._owners.pop(machine, None)
        await self.ownership.release(machine, tenant)

    async def visible(self, machines: Iterable[str]) -> list[str]:
        """The machines of ``machines`` that the current tenant owns, in order."""
        mine = await self.ownership.machines(self._current())
        return [m for m in machines if m in mine]

    def _current(self) -> str:
        tenant = CURRENT_TENANT.get()
        if tenant is None:  # pragma: no cover - admit() always runs first
            raise Unauthenticated("no tenant")
        return tenant

    def _remember(self, machine: str, owner: str) -> None:
        if len(self._owners) >= self.cache_size:
            self._owners.clear()  # crude, but owners are one GET away
        self._owners[machine] = owner
