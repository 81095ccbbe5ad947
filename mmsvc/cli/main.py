"""The ``mmsvc`` command line.

    mmsvc serve  [--listen 127.0.0.1:50051] [--redis URL] [--workers N] [--metrics-port P]
                 [--log-format auto|json|console] [--log-level LEVEL]
                 [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]]
                 [--tenant-tokens FILE] [--redis-password-file FILE]
    mmsvc stat   --target HOST:PORT --machine M [--all] [--wide]
    mmsvc check  --target HOST:PORT --machine M [--drain]
    mmsvc replay TRACE.json [TRACE.json ...] [--target HOST:PORT] [--batch-size N]
                 [--profile seed|linux-6.18] [--set KEY=VALUE ...]
    mmsvc demo   [--target HOST:PORT] [--procs N] [--batch-size N]
    mmsvc ping   --target HOST:PORT

Without ``--redis`` (serve) or ``--target`` (replay, demo) a private Redis and/or an in-process
server are started for the duration of the command.  Commands with ``--target`` connect over TLS
with ``--tls``/``--tls-ca``/``--tls-cert``/``--tls-key`` (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mmsvc import __version__
from mmsvc.logging import configure_logging, get_logger
from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError

if TYPE_CHECKING:
    from mmsvc.server.security import ServerSecurity

DEFAULT_LISTEN = "127.0.0.1:50051"

log = get_logger("mmsvc.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsvc",
        description="Emulated Linux mlock/munlock memory management over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"mmsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT (default %(default)s)")
    serve.add_argument(
        "--redis", default=None, metavar="URL",
        help="Redis URL of the page store: redis://[user[:password]@]host:port/db, rediss:// "
             "for TLS (default: env MMSVC_REDIS_URL, else a private embedded redis-server); "
             "keep passwords off the command line (MMSVC_REDIS_URL, --redis-password-file)",
    )
    serve.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N",
        help="worker processes = emulated CPUs; worker i also listens on PORT+1+i "
             "(default %(default)s)",
    )
    serve.add_argument(
        "--cpus-per-worker", type=_positive_int, default=1, metavar="K",
        help="emulated CPUs per worker process; a task moves between them at reschedule "
             "points with the machine's task_migrate_permille (default %(default)s)",
    )
    serve.add_argument(
        "--cpu-base", type=_nonnegative_int, default=0, metavar="B",
        help="worker i runs CPUs B+i*K .. B+i*K+K-1: give each host of a shared store its "
             "own range (default %(default)s)",
    )
    serve.add_argument(
        "--cpu-lease-ms", type=_positive_int, default=None, metavar="MS",
        help="CPU lease: a dead worker's batches are drained by a survivor within about "
             "this time (default 3000; env MMSVC_CPU_LEASE_MS)",
    )
    serve.add_argument(
        "--metrics-port", type=_port, default=None, metavar="P",
        help="serve Prometheus /metrics on P (worker i on P+i)",
    )
    serve.add_argument(
        "--log-format", choices=("auto", "json", "console"), default="auto",
        help="log format (default: json unless stdout is a TTY)",
    )
    serve.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    sec = serve.add_argument_group("security (docs/security.md)")
    sec.add_argument(
        "--tls-cert", default=None, metavar="FILE",
        help="PEM server certificate chain: serve TLS on every port (env MMSVC_TLS_CERT)",
    )
    sec.add_argument(
        "--tls-key", default=None, metavar="FILE",
        help="PEM private key of --tls-cert, unencrypted (env MMSVC_TLS_KEY)",
    )
    sec.add_argument(
        "--tls-client-ca", default=None, metavar="FILE",
        help="PEM CA bundle: require client certificates it signed (mutual TLS); each "
             "certificate's subject CN is a tenant (env MMSVC_TLS_CLIENT_CA)",
    )
    sec.add_argument(
        "--tenant-tokens", default=None, metavar="FILE",
        help="'TENANT TOKEN' lines: tenants by bearer token, over TLS (env MMSVC_TENANT_TOKENS)",
    )
    sec.add_argument(
        "--redis-password-file", default=None, metavar="FILE",
        help="the Redis password, added to the store URL (env MMSVC_REDIS_PASSWORD holds the "
             "password itself)",
    )

    def add_target(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "--target", required=required, default=None, metavar="HOST:PORT",
            help="server address" + ("" if required else
                                     " (default: an in-process server with embedded Redis)"),
        )
        p.add_argument(
            "--timeout", type=float, default=60.0, metavar="SECONDS",
            help="deadline of each call (default %(default)s)",
        )
        tls = p.add_argument_group("TLS to --target (docs/security.md)")
        tls.add_argument(
            "--tls", action="store_true",
            help="connect over TLS (implied by the options below; gRPC's default CA roots "
                 "unless --tls-ca)",
        )
        tls.add_argument(
            "--tls-ca", default=None, metavar="FILE",
            help="PEM CA bundle to verify the server with (env MMSVC_TLS_CA)",
        )
        tls.add_argument(
            "--tls-cert", default=None, metavar="FILE",
            help="PEM client certificate for mutual TLS (env MMSVC_TLS_CLIENT_CERT)",
        )
        tls.add_argument(
            "--tls-key", default=None, metavar="FILE",
            help="PEM private key of --tls-cert (env MMSVC_TLS_CLIENT_KEY)",
        )
        tls.add_argument(
            "--tls-server-name", default=None, metavar="NAME",
            help="name to verify in the server certificate instead of the target host "
                 "(env MMSVC_TLS_SERVER_NAME)",
        )
        tls.add_argument(
            "--token-file", default=None, metavar="FILE",
            help="bearer token for a server with tenant tokens (env MMSVC_TOKEN_FILE, or "
                 "MMSVC_TOKEN with the token itself)",
        )

    stat = sub.add_parser("stat", help="print vmstat, meminfo and lock_stat of a machine")
    add_target(stat, required=True)
    stat.add_argument("--machine", required=True, metavar="M")
    stat.add_argument("--all", action="store_true", help="show zero vmstat counters too")
    stat.add_argument("--wide", action="store_true", help="every /proc/lock_stat column")

    check = sub.add_parser("check", help="run the consistency checker on a machine")
    add_target(check, required=True)
    check.add_argument("--machine", required=True, metavar="M")
    check.add_argument("--drain", action="store_true", help="drain every CPU's batches first")

    replay = sub.add_parser("replay", help="execute trace files and print the result JSON")
    replay.add_argument("traces", nargs="+", metavar="TRACE.json")
    add_target(replay, required=False)
    replay.add_argument(
        "--batch-size", type=_positive_int, default=None, metavar="N",
        help="mlock and lru_add batch length (default: the profile's; seed 15, Linux 6.18 31)",
    )
    replay.add_argument(
        "--profile", choices=("seed", "linux-6.18"), default="seed",
        help="kernel behaviour to emulate: the seed-era rework (batches of 15, populate does "
             "not drain) or Linux 6.18 (batches of 31, populate drains, large-folio mlock "
             "rules); default %(default)s",
    )
    replay.add_argument(
        "--set", dest="settings", type=_machine_setting, action="append", default=[],
        metavar="KEY=VALUE",
        help="a machine setting of the replayed machine (a MachineConfig field, e.g. "
             "vm_io_guard=off, migration_drain=off, final_clearance=mapcount_zero), applied "
             "on top of --profile and --batch-size; repeatable",
    )
    replay.add_argument(
        "--redis", default=None, metavar="URL",
        help="page store for the in-process server (default: embedded redis-server)",
    )
    replay.add_argument(
        "--indent", type=int, default=2, help="JSON indent; -1 for one line (default 2)"
    )

    demo = sub.add_parser("demo", help="run a short scripted load and print a report")
    add_target(demo, required=False)
    demo.add_argument("--procs", type=_positive_int, default=4, metavar="N")
    demo.add_argument("--batch-size", type=_positive_int, default=15, metavar="N")
    demo.add_argument("--redis", default=None, metavar="URL", help=argparse.SUPPRESS)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    ping = sub.add_parser("ping", help="check that a server answers")
    add_target(ping, required=True)

    from mmsvc.conformance.report import add_arguments as add_conformance_arguments

    conformance = sub.add_parser(
        "conformance", help="fidelity report: replay the kernel-recorded traces and compare"
    )
    add_conformance_arguments(conformance)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _machine_setting(text: str) -> tuple[str, object]:
    """replay --set KEY=VALUE: a MachineConfig field, parsed against its type."""
    from mmsvc.cli.replay import parse_setting

    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number")
    return value


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from mmsvc.mm.cpu_hotplug import LEASE_ENV
    from mmsvc.server.security import redact_url
    from mmsvc.server.workers import run_workers, worker_configs, worker_main
    from mmsvc.store.embedded import EmbeddedRedis

    configure_logging(args.log_format, args.log_level)
    if args.cpu_lease_ms is not None:  # read by every worker (spawned with this environment)
        os.environ[LEASE_ENV] = str(args.cpu_lease_ms)
    security = _server_security(args)
    security.check_files()  # once, here, rather than in every worker
    url = _store_url(args)
    redis: EmbeddedRedis | None = None
    try:
        if url is None:
            redis = EmbeddedRedis().start()
            url = redis.url
            log.info("embedded_redis_started", url=redact_url(url), pid=redis.pid)
        else:
            log.info("redis_store", url=redact_url(url))
        # The URL (password included) reaches the workers through the spawn pipe, never argv.
        configs = worker_configs(
            url, args.listen, args.workers, args.metrics_port, args.log_format, args.log_level,
            cpu_base=args.cpu_base, security=security, cpus_per_worker=args.cpus_per_worker,
        )
        if args.workers == 1:
            worker_main(configs[0])
            return 0
        return run_workers(configs)
    finally:
        if redis is not None:
            redis.stop()


def _server_security(args: argparse.Namespace) -> ServerSecurity:
    """serve's TLS / mutual TLS / tenant tokens, from the flags or their env variables."""
    from mmsvc.server import security as s

    env = os.environ
    return s.ServerSecurity(
        cert_file=args.tls_cert or env.get(s.ENV_TLS_CERT) or None,
        key_file=args.tls_key or env.get(s.ENV_TLS_KEY) or None,
        client_ca_file=args.tls_client_ca or env.get(s.ENV_TLS_CLIENT_CA) or None,
        tenant_tokens_file=args.tenant_tokens or env.get(s.ENV_TENANT_TOKENS) or None,
    )


def _store_url(args: argparse.Namespace) -> str | None:
    """The store URL of serve (None: embedded), with a separately given password added."""
    from mmsvc.server import security as s

    if args.redis and s.url_password(args.redis):
        log.warning(
            "redis_password_on_command_line",
            hint=f"other users can read the command line: use {s.ENV_REDIS_URL} or "
                 "--redis-password-file",
        )
    url: str | None = args.redis or os.environ.get(s.ENV_REDIS_URL) or None
    password: str | None = None
    if args.redis_password_file:
        lines = s.read_file(args.redis_password_file, "Redis password file").decode()
        password = lines.splitlines()[0].strip() if lines.strip() else ""
        if not password:
            raise s.SecurityError(f"{args.redis_password_file}: no password in the first line")
    elif os.environ.get(s.ENV_REDIS_PASSWORD):
        password = os.environ[s.ENV_REDIS_PASSWORD]
    if password is not None:
        if url is None:
            raise s.SecurityError(
                f"a Redis password needs a store URL (--redis or {s.ENV_REDIS_URL})"
            )
        url = s.url_with_password(url, password)
    return url


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``tls=`` / ``token=`` for a client of --target, from the flags or their env variables."""
    from mmsvc.server.security import SecurityError
    from mmsvc_client import TLSOptions
    from mmsvc_client._base import (
        ENV_TLS_CA,
        ENV_TLS_CLIENT_CERT,
        ENV_TLS_CLIENT_KEY,
        ENV_TLS_SERVER_NAME,
        read_token_file,
        token_from_env,
    )

    env = os.environ
    ca = args.tls_ca or env.get(ENV_TLS_CA) or None
    cert = args.tls_cert or env.get(ENV_TLS_CLIENT_CERT) or None
    key = args.tls_key or env.get(ENV_TLS_CLIENT_KEY) or None
    name = args.tls_server_name or env.get(ENV_TLS_SERVER_NAME) or None
    try:
        token = read_token_file(args.token_file) if args.token_file else token_from_env()
        for path in (ca, cert, key):
            if path is not None:
                open(path, "rb").close()  # a clear error now, not a failed handshake later
        if not (args.tls or ca or cert or key or name or token):
            return {}
        return {"tls": TLSOptions(ca=ca, cert=cert, key=key, server_name=name), "token": token}
    except (OSError, ValueError) as e:
        raise SecurityError(str(e)) from None


@asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[AsyncMmsvcClient]:
    """An AsyncMmsvcClient for --target, or for an in-process embedded server."""
    from mmsvc.server.app import embedded_server

    if args.target:
        async with AsyncMmsvcClient(
            args.target, timeout=args.timeout, **_client_options(args)
        ) as client:
            yield client
        return
    async with (
        embedded_server(redis_url=getattr(args, "redis", None)) as server,
        AsyncMmsvcClient(f"127.0.0.1:{server.port}", timeout=args.timeout) as client,
    ):
        yield client


def cmd_replay(args: argparse.Namespace) -> int:
    from mmsvc.cli.replay import ReplayError, dumps, load_trace, replay_traces

    try:
        traces = [load_trace(path) for path in args.traces]
    except (OSError, ValueError) as e:
        print(f"mmsvc replay: {e}", file=sys.stderr)
        return 2

    async def run() -> dict[str, object]:
        async with _client(args) as client:
            linux = args.profile == "linux-6.18"
            batch = args.batch_size or (31 if linux else 15)
            return await replay_traces(client, traces, batch, populate_drain=linux,
                                       settings=dict(args.settings))

    try:
        doc = asyncio.run(run())
    except ReplayError as e:
        print(f"mmsvc replay: bad trace: {e}", file=sys.stderr)
        return 2
    print(dumps(doc, indent=None if args.indent < 0 else args.indent))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmsvc.cli.demo import run_demo

    console = Console()

    async def run() -> bool:
        async with _client(args) as client:
            return await run_demo(
                client, console, args.procs, args.batch_size, progress=not args.no_progress
            )

    return 0 if asyncio.run(run()) else 1


def cmd_stat(args: argparse.Namespace) -> int:
    from mmsvc.cli.tables import lock_stat_table, meminfo_table, vmstat_table

    console = Console()
    with MmsvcClient(args.target, timeout=args.timeout, **_client_options(args)) as k:
        console.print(vmstat_table(k.vmstat(args.machine), show_all=args.all))
        console.print(meminfo_table(k.meminfo(args.machine)))
        console.print(lock_stat_table(k.lock_stat(args.machine), "lock_stat (µs)", args.wide))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mmsvc.cli.tables import check_text

    with MmsvcClient(args.target, timeout=args.timeout, **_client_options(args)) as k:
        report = k.check(args.machine, args.drain)
    Console().print(check_text(report))
    return 0 if report.ok else 1


def cmd_ping(args: argparse.Namespace) -> int:

    with MmsvcClient(args.target, timeout=args.timeout, **_client_options(args)) as k:
        cpu = k.ping()
    print(f"pong from cpu {cpu}")
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from mmsvc.conformance.report import run

    return run(args.kernel, args.names, args.redis)


COMMANDS = {
    "serve": cmd_serve,
    "stat": cmd_stat,
    "check": cmd_check,
    "replay": cmd_replay,
    "demo": cmd_demo,
    "ping": cmd_ping,
    "conformance": cmd_conformance,
}


def main(argv: Sequence[str] | None = None) -> int:
    from mmsvc.server.security import SecurityError
    from mmsvc.store.embedded import EmbeddedRedisError

    args = build_parser().parse_args(argv)
    if args.command != "serve":
        # keep stdout for results (replay prints JSON): library logs go to stderr
        configure_logging("auto", "warning", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except MmsvcError as e:
        print(f"mmsvc {args.command}: {e}", file=sys.stderr)
        return 1
    except EmbeddedRedisError as e:
        print(f"mmsvc {args.command}: {e}", file=sys.stderr)
        return 1
    except SecurityError as e:
        print(f"mmsvc {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
