"""The ``mmsvc`` command line.

    mmsvc serve  [--listen 127.0.0.1:50051] [--redis URL] [--workers N] [--metrics-port P]
                 [--log-format auto|json|console] [--log-level LEVEL]
    mmsvc stat   --target HOST:PORT --machine M [--all] [--wide]
    mmsvc check  --target HOST:PORT --machine M [--drain]
    mmsvc replay TRACE.json [TRACE.json ...] [--target HOST:PORT] [--batch-size N]
    mmsvc demo   [--target HOST:PORT] [--procs N] [--batch-size N]
    mmsvc ping   --target HOST:PORT

Without ``--redis`` (serve) or ``--target`` (replay, demo) a private Redis and/or an in-process
server are started for the duration of the command.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from rich.console import Console

from mmsvc import __version__
from mmsvc.logging import configure_logging, get_logger
from mmsvc_client import AsyncMmsvcClient, MmsvcClient, MmsvcError

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
        help="Redis URL of the page store (default: start a private embedded redis-server)",
    )
    serve.add_argument(
        "--workers", type=_positive_int, default=1, metavar="N",
        help="worker processes = emulated CPUs; worker i also listens on PORT+1+i "
             "(default %(default)s)",
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
             "not drain) or Linux 6.18 (batches of 31, populate drains); default %(default)s",
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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number")
    return value


# -- commands ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from mmsvc.server.workers import run_workers, worker_configs, worker_main
    from mmsvc.store.embedded import EmbeddedRedis

    configure_logging(args.log_format, args.log_level)
    redis: EmbeddedRedis | None = None
    url = args.redis
    try:
        if url is None:
            redis = EmbeddedRedis().start()
            url = redis.url
            log.info("embedded_redis_started", url=url, pid=redis.pid)
        configs = worker_configs(
            url, args.listen, args.workers, args.metrics_port, args.log_format, args.log_level
        )
        if args.workers == 1:
            worker_main(configs[0])
            return 0
        return run_workers(configs)
    finally:
        if redis is not None:
            redis.stop()


@asynccontextmanager
async def _client(args: argparse.Namespace) -> AsyncIterator[AsyncMmsvcClient]:
    """An AsyncMmsvcClient for --target, or for an in-process embedded server."""
    from mmsvc.server.app import embedded_server

    if args.target:
        async with AsyncMmsvcClient(args.target, timeout=args.timeout) as client:
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
            return await replay_traces(client, traces, batch, populate_drain=linux)

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
    with MmsvcClient(args.target, timeout=args.timeout) as k:
        console.print(vmstat_table(k.vmstat(args.machine), show_all=args.all))
        console.print(meminfo_table(k.meminfo(args.machine)))
        console.print(lock_stat_table(k.lock_stat(args.machine), "lock_stat (µs)", args.wide))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from mmsvc.cli.tables import check_text

    with MmsvcClient(args.target, timeout=args.timeout) as k:
        report = k.check(args.machine, args.drain)
    Console().print(check_text(report))
    return 0 if report.ok else 1


def cmd_ping(args: argparse.Namespace) -> int:

    with MmsvcClient(args.target, timeout=args.timeout) as k:
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
