"""TLS, mutual TLS and per-tenant access, end to end: a real mmsvc server (real kernel, real
redis-server) on a real socket, with a throwaway CA, a server certificate and one client
certificate per tenant generated for the session.

The isolation tests prove that a client authenticated as tenant-b can neither see nor act on
tenant-a's machine and processes: every RPC answers exactly what it answers for a machine that
does not exist, and tenant-a's state is unchanged afterwards.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
import pytest_asyncio
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mmsvc.cli.main import main
from mmsvc.mm.types import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    MAP_SHARED,
    Advice,
    FileSpec,
    MmapArgs,
)
from mmsvc.server.app import SERVICE_NAME, MmsvcServer, build_server, redis_kernel_factory
from mmsvc.server.security import SecurityError, ServerSecurity
from mmsvc.server.tenancy import owner_key, tenant_machines_key
from mmsvc_client import NO_RETRY, AsyncMmsvcClient, MmsvcError, TLSOptions

PAGE = 4096

# -- a throwaway PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path  # the CA that signs the server and the tenants
    server_cert: Path
    server_key: Path
    rogue_ca: Path  # an unrelated CA

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"

    def tls(self, name: str | None, ca: Path | None = None) -> TLSOptions:
        """Client options: trust our CA; present ``name``'s certificate (None: none)."""
        if name is None:
            return TLSOptions(ca=str(ca or self.ca))
        cert, key = self.client(name)
        return TLSOptions(ca=str(ca or self.ca), cert=str(cert), key=str(key))


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str | None) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")
    ])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))


def _builder(subject: x509.Name, issuer: x509.Name, public: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(path: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(_name(cn), _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(path, cert, key)
    return cert, key


def issue(
    path: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    cn: str | None,
    server: bool = False,
) -> None:
    """A leaf certificate (``path``) and its key (``path`` with suffix .key)."""
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(cn), ca[0].subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    _write(path, builder.sign(ca[1], hashes.SHA256()), key)


def make_pki(d: Path) -> Pki:
    ca = make_ca(d / "ca.pem", "mmsvc test CA")
    rogue = make_ca(d / "rogue-ca.pem", "mmsvc rogue CA")
    issue(d / "server.pem", ca, "mmsvc server", server=True)
    for tenant in ("tenant-a", "tenant-b"):
        issue(d / f"{tenant}.pem", ca, tenant)
    issue(d / "no-cn.pem", ca, None)
    issue(d / "forged-a.pem", rogue, "tenant-a")  # tenant-a's name, signed by the wrong CA
    return Pki(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "rogue-ca.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mtls(pki: Pki) -> ServerSecurity:
    return ServerSecurity(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key), client_ca_file=str(pki.ca)
    )


async def start_server(redis_url: str, security: ServerSecurity) -> MmsvcServer:
    server = await build_server(
        redis_kernel_factory(redis_url, 0), "127.0.0.1:0", None,
        metrics_poll_interval=None, security=security,
    )
    await server.start()
    return server


@pytest_asyncio.fixture
async def mtls_server(redis_url: str, pki: Pki) -> AsyncIterator[MmsvcServer]:
    server = await start_server(redis_url, mtls(pki))
    try:
        yield server
    finally:
        await server.stop(None)


def client(server: MmsvcServer, tls: TLSOptions | None, **kw: Any) -> AsyncMmsvcClient:
    return AsyncMmsvcClient(f"127.0.0.1:{server.port}", tls=tls, timeout=10, **kw)


# -- transport -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_clients_without_a_trusted_certificate_are_rejected(
    mtls_server: MmsvcServer, pki: Pki
) -> None:
    target = f"127.0.0.1:{mtls_server.port}"
    rejected = [
        AsyncMmsvcClient(target, timeout=5, retry=NO_RETRY),  # plaintext
        client(mtls_server, pki.tls(None), retry=NO_RETRY),  # TLS, no client certificate
        client(mtls_server, pki.tls("forged-a"), retry=NO_RETRY),  # certificate of another CA
        # a client that does not trust the server's CA refuses the server
        client(mtls_server, pki.tls("tenant-a", ca=pki.rogue_ca), retry=NO_RETRY),
        # ... and one expecting a name the server's certificate does not have
        client(mtls_server, replace(pki.tls("tenant-a"), server_name="other"), retry=NO_RETRY),
    ]
    for k in rejected:
        async with k:
            with pytest.raises(MmsvcError) as err:
                await k.list_machines()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert err.value.errno is None  # refused in the handshake, before any RPC

    async with client(mtls_server, pki.tls("tenant-a")) as a:
        assert await a.ping() == 0
    async with client(mtls_server, replace(pki.tls("tenant-a"), server_name="localhost")) as a:
        assert await a.ping() == 0  # the certificate names localhost too


@pytest.mark.asyncio
async def test_certificate_without_common_name_is_unauthenticated(
    mtls_server: MmsvcServer, pki: Pki
) -> None:
    async with client(mtls_server, pki.tls("no-cn")) as k:
        with pytest.raises(MmsvcError) as err:
            await k.create_machine()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.errno == "UNAUTHENTICATED"


@pytest.mark.asyncio
async def test_health_and_reflection_over_mutual_tls(mtls_server: MmsvcServer, pki: Pki) -> None:
    cert, key = pki.client("tenant-a")
    creds = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_server.port}", creds) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in refl.ServerReflectionInfo(iter([req])):
            names = {s.name for s in resp.list_services_response.service}
            assert SERVICE_NAME in names
            break


def test_security_configuration_is_checked(pki: Pki, tmp_path: Path) -> None:
    cert, key = str(pki.server_cert), str(pki.server_key)
    for bad in (
        dict(cert_file=cert),  # no key
        dict(client_ca_file=str(pki.ca)),  # mutual TLS without TLS
        dict(tenant_tokens_file=str(tmp_path / "t")),  # tokens over plaintext
    ):
        with pytest.raises(SecurityError):
            ServerSecurity(**bad)  # type: ignore[arg-type]
    a_key = str(pki.client("tenant-a")[1])
    with pytest.raises(SecurityError, match="valid pair"):
        ServerSecurity(cert_file=cert, key_file=a_key).check_files()
    with pytest.raises(SecurityError, match="cannot read"):
        ServerSecurity(cert_file=cert, key_file=str(tmp_path / "missing")).check_files()
    assert ServerSecurity().mode == "plaintext" and ServerSecurity().tenant_source is None
    plain_tls = ServerSecurity(cert_file=cert, key_file=key)
    assert (plain_tls.mode, plain_tls.tenant_source) == ("tls", None)
    assert (mtls(pki).mode, mtls(pki).tenant_source) == ("mtls", "certificate")


# -- tenants -------------------------------------------------------------------------------------


def shape(err: MmsvcError, machine: str) -> tuple[Any, ...]:
    """What a caller can observe of an error, with the machine id blanked out."""
    meta = {k: "<M>" if k == "machine" and v == machine else v for k, v in err.metadata.items()}
    return err.code, err.errno, err.message.replace(repr(machine), "<M>"), sorted(meta.items())


def machine_ops(pid: int, addr: int) -> dict[str, Callable[[AsyncMmsvcClient, str],
                                                           Awaitable[Any]]]:
    """Every RPC that names a machine (and, where it takes one, tenant-a's pid and address)."""
    return {
        "GetMachine": lambda k, m: k.machine_config(m),
        "CreateFile": lambda k, m: k.create_file(m, FileSpec("g", 4)),
        "CreateProcess": lambda k, m: k.create_process(m),
        "Fork": lambda k, m: k.fork(m, pid),
        "Setrlimit": lambda k, m: k.setrlimit(m, pid, 0, 0),
        "DropCapability": lambda k, m: k.drop_capability(m, pid),
        "Mmap": lambda k, m: k.mmap(m, pid, MmapArgs(PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS)),
        "Munmap": lambda k, m: k.munmap(m, pid, addr, PAGE),
        "Mprotect": lambda k, m: k.mprotect(m, pid, addr, PAGE, 1),
        "Madvise": lambda k, m: k.madvise(m, pid, addr, PAGE, Advice.MADV_DONTNEED),
        "Mlock": lambda k, m: k.mlock(m, pid, addr, PAGE),
        "Munlock": lambda k, m: k.munlock(m, pid, addr, 4 * PAGE),
        "Mlockall": lambda k, m: k.mlockall(m, pid, 1),
        "Munlockall": lambda k, m: k.munlockall(m, pid),
        "Fault": lambda k, m: k.fault(m, pid, addr, PAGE, True),
        "Migrate": lambda k, m: k.migrate(m, pid, addr, PAGE, 1),
        "Isolate": lambda k, m: k.isolate(m, pid, addr, PAGE),
        "Putback": lambda k, m: k.putback(m, pid, addr, PAGE),
        "ShmCreate": lambda k, m: k.shm_create(m, pid, 1),
        "ShmAttach": lambda k, m: k.shm_attach(m, pid, 1),
        "ShmCtl": lambda k, m: k.shm_ctl(m, pid, 1, "SHM_LOCK"),
        "KsmMerge": lambda k, m: k.ksm_merge(m, pid, addr, pid, addr + PAGE),
        "UffdCopy": lambda k, m: k.uffd_copy(m, pid, addr, PAGE),
        "Reclaim": lambda k, m: k.reclaim(m, None, None, 32),
        "Drain": lambda k, m: k.drain(m, True),
        "Vmstat": lambda k, m: k.vmstat(m),
        "Meminfo": lambda k, m: k.meminfo(m),
        "ProcStatus": lambda k, m: k.proc_status(m, pid),
        "Smaps": lambda k, m: k.smaps(m, pid),
        "PageFlags": lambda k, m: k.page_flags(m, pid, addr, 4 * PAGE),
        "FilePages": lambda k, m: k.file_pages(m, "f"),
        "LockStat": lambda k, m: k.lock_stat(m),
        "Check": lambda k, m: k.check(m, True),
        "Exit": lambda k, m: k.exit(m, pid),
        "DeleteMachine": lambda k, m: k.delete_machine(m),
    }


async def snapshot(k: AsyncMmsvcClient, m: str, pid: int, addr: int) -> Any:
    return (
        await k.vmstat(m),
        await k.meminfo(m),
        await k.proc_status(m, pid),
        await k.smaps(m, pid),
        await k.page_flags(m, pid, addr, 4 * PAGE),
        await k.file_pages(m, "f"),
        await k.machine_config(m),
    )


@pytest.mark.asyncio
async def test_tenant_b_cannot_see_or_touch_tenant_a(mtls_server: MmsvcServer, pki: Pki) -> None:
    async with (
        client(mtls_server, pki.tls("tenant-a")) as a,
        client(mtls_server, pki.tls("tenant-b")) as b,
    ):
        m = await a.create_machine()
        await a.create_file(m, FileSpec("f", 4, prefill=True))
        pid = await a.create_process(m)
        child = await a.fork(m, pid)
        addr = await a.mmap(m, pid, MmapArgs(4 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS))
        await a.fault(m, pid, addr, 4 * PAGE, True)
        await a.mlock(m, pid, addr, 2 * PAGE)
        await a.mmap(m, child, MmapArgs(4 * PAGE, 1, MAP_SHARED, file="f"))
        await a.drain(m, True)
        before = await snapshot(a, m, pid, addr)
        assert before[0]["unevictable_pgs_mlocked"] == 2

        mb = await b.create_machine()
        assert await a.list_machines() == [m]
        assert await b.list_machines() == [mb]

        missing = str(int(mb) + 1000)  # an id no machine has
        for name, op in machine_ops(pid, addr).items():
            with pytest.raises(MmsvcError) as foreign:
                await op(b, m)
            with pytest.raises(MmsvcError) as absent:
                await op(b, missing)
            assert foreign.value.code == grpc.StatusCode.NOT_FOUND, name
            assert foreign.value.errno == "ESRCH", name
            assert foreign.value.message == f"no machine {m!r}", name
            assert foreign.value.machine == m, name
            assert shape(foreign.value, m) == shape(absent.value, missing), name

        # nothing of tenant-a's changed, and tenant-a still has full use of it
        assert await snapshot(a, m, pid, addr) == before
        assert await a.list_machines() == [m]
        assert (await a.proc_status(m, child)).alive
        await a.munlock(m, pid, addr, 4 * PAGE)
        await a.drain(m, True)
        assert (await a.vmstat(m))["unevictable_pgs_munlocked"] == 2
        assert (await a.check(m, True)).ok

        # the owner's view of its machine is unchanged by tenancy; b's own machine works
        bp = await b.create_process(mb)
        assert (await b.proc_status(mb, bp)).alive
        with pytest.raises(MmsvcError) as err:
            await a.vmstat(mb)
        assert err.value.errno == "ESRCH"

        await a.exit(m, child)
        await a.delete_machine(m)
        assert await a.list_machines() == []
        assert await b.list_machines() == [mb]


@pytest.mark.asyncio
async def test_ownership_is_durable_and_deleted_with_the_machine(
    redis_url: str, pki: Pki
) -> None:
    server = await start_server(redis_url, mtls(pki))
    try:
        async with client(server, pki.tls("tenant-a")) as a:
            m = await a.create_machine()
            pid = await a.create_process(m)
    finally:
        await server.stop(None)

    r = redis.Redis.from_url(redis_url)
    try:
        assert r.get(owner_key(m)) == b"tenant-a"
        assert r.smembers(tenant_machines_key("tenant-a")) == {m.encode()}

        server = await start_server(redis_url, mtls(pki))  # a new worker: empty cache
        try:
            async with (
                client(server, pki.tls("tenant-a")) as a,
                client(server, pki.tls("tenant-b")) as b,
            ):
                assert await b.list_machines() == []
                with pytest.raises(MmsvcError):
                    await b.proc_status(m, pid)
                assert (await a.proc_status(m, pid)).alive
                assert await a.list_machines() == [m]
                await a.delete_machine(m)
        finally:
            await server.stop(None)
        assert r.get(owner_key(m)) is None
        assert r.smembers(tenant_machines_key("tenant-a")) == set()
    finally:
        r.close()


@pytest.mark.asyncio
async def test_plain_tls_keeps_a_single_tenant(redis_url: str, pki: Pki) -> None:
    security = ServerSecurity(cert_file=str(pki.server_cert), key_file=str(pki.server_key))
    server = await start_server(redis_url, security)
    try:
        async with (
            client(server, pki.tls(None)) as one,
            client(server, pki.tls(None)) as other,
        ):
            m = await one.create_machine()
            assert await other.list_machines() == [m]  # no tenants: everyone sees everything
            await other.delete_machine(m)
        async with AsyncMmsvcClient(f"127.0.0.1:{server.port}", timeout=5, retry=NO_RETRY) as k:
            with pytest.raises(MmsvcError) as err:
                await k.ping()  # plaintext to a TLS port
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


TOKEN_A = "a" * 8 + "-token-of-tenant-a"
TOKEN_B = "b" * 8 + "-token-of-tenant-b"


@pytest.mark.asyncio
async def test_tenant_tokens(
    redis_url: str, pki: Pki, tmp_path: Path, log_stream: io.StringIO
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# tenant token\ntenant-a {TOKEN_A}\n\ntenant-b {TOKEN_B}\n")
    security = ServerSecurity(
        cert_file=str(pki.server_cert), key_file=str(pki.server_key),
        tenant_tokens_file=str(tokens),
    )
    assert security.tenant_source == "token"
    server = await start_server(redis_url, security)
    try:
        tls = pki.tls(None)
        for token in (None, "not-a-token-of-anyone"):
            async with client(server, tls, token=token) as k:
                with pytest.raises(MmsvcError) as err:
                    await k.list_machines()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with (
            client(server, tls, token=TOKEN_A) as a,
            client(server, tls, token=TOKEN_B) as b,
        ):
            m = await a.create_machine()
            assert await b.list_machines() == []
            with pytest.raises(MmsvcError) as err:
                await b.vmstat(m)
            assert (err.value.code, err.value.errno) == (grpc.StatusCode.NOT_FOUND, "ESRCH")
            assert await a.list_machines() == [m]
    finally:
        await server.stop(None)
    logs = log_stream.getvalue()
    assert TOKEN_A not in logs and TOKEN_B not in logs
    tenants = [json.loads(x).get("tenant") for x in logs.splitlines() if '"event": "rpc"' in x]
    assert {"tenant-a", "tenant-b"} <= set(tenants)
    with pytest.raises(ValueError, match="only sent over TLS"):
        AsyncMmsvcClient("127.0.0.1:1", token=TOKEN_A)


def test_bad_tenant_tokens_files(tmp_path: Path, pki: Pki) -> None:
    from mmsvc.server.tenancy import TokenTenants

    cases = {
        "short": "tenant-a short\n",
        "fields": f"tenant-a {TOKEN_A} extra\n",
        "shared": f"tenant-a {TOKEN_A}\ntenant-b {TOKEN_A}\n",
        "empty": "# nothing\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(SecurityError) as err:
            TokenTenants.from_file(str(path))
        assert TOKEN_A not in str(err.value), name
    with pytest.raises(SecurityError):  # what serve checks before it starts a worker
        ServerSecurity(
            cert_file=str(pki.server_cert), key_file=str(pki.server_key),
            tenant_tokens_file=str(tmp_path / "shared"),
        ).check_files()


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cli_commands_over_mutual_tls(
    mtls_server: MmsvcServer, pki: Pki, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = f"127.0.0.1:{mtls_server.port}"

    def flags(tenant: str) -> list[str]:
        cert, key = pki.client(tenant)
        return ["--target", target, "--tls-ca", str(pki.ca), "--tls-cert", str(cert),
                "--tls-key", str(key), "--timeout", "10"]

    async with client(mtls_server, pki.tls("tenant-a")) as a:
        m = await a.create_machine()
        pid = await a.create_process(m)
        addr = await a.mmap(m, pid, MmapArgs(2 * PAGE, 3, MAP_PRIVATE | MAP_ANONYMOUS))
        await a.mlock(m, pid, addr, 2 * PAGE)

    def run(argv: list[str]) -> Awaitable[int]:
        return asyncio.to_thread(main, argv)

    assert await run(["ping", *flags("tenant-a")]) == 0
    assert "pong from cpu 0" in capsys.readouterr().out
    assert await run(["stat", *flags("tenant-a"), "--machine", m]) == 0
    assert "unevictable_pgs_mlocked" in capsys.readouterr().out
    assert await run(["check", *flags("tenant-a"), "--machine", m, "--drain"]) == 0
    assert "checker: OK" in capsys.readouterr().out

    for cmd in ("stat", "check"):
        assert await run([cmd, *flags("tenant-b"), "--machine", m]) == 1
        assert f"ESRCH: no machine {m!r}" in capsys.readouterr().err

    # the same through the environment
    cert, key = pki.client("tenant-a")
    monkeypatch.setenv("MMSVC_TLS_CA", str(pki.ca))
    monkeypatch.setenv("MMSVC_TLS_CLIENT_CERT", str(cert))
    monkeypatch.setenv("MMSVC_TLS_CLIENT_KEY", str(key))
    assert await run(["check", "--target", target, "--machine", m]) == 0
    capsys.readouterr()

    # a missing client key is a usage error, not a failed handshake
    monkeypatch.delenv("MMSVC_TLS_CLIENT_KEY")
    assert await run(["ping", "--target", target]) == 2
    assert "key" in capsys.readouterr().err
