"""A real Redis Cluster made of ``redis-server`` child processes, for the cluster tests.

``LocalRedisCluster(root).start()`` starts ``masters * (1 + replicas)`` servers on free loopback
ports (client port and cluster-bus port both picked free, so nothing near 6379 and no server we
did not start is ever touched), each with its own directory under ``root`` and persistence off,
joins them with ``redis-cli --cluster create ... --cluster-replicas N --cluster-yes`` and waits
until every node reports ``cluster_state:ok``, knows every other node and every replica's link
to its primary is up.  :meth:`stop` terminates them all.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from mmsvc.store.embedded import find_redis_server, free_port, server_pid

HOST = "127.0.0.1"


class LocalClusterError(RuntimeError):
    """The cluster could not be started or did not converge."""


def find_redis_cli(server: str) -> str:
    """redis-cli next to redis-server, else from PATH."""
    sibling = Path(server).with_name("redis-cli")
    if sibling.exists():
        return str(sibling)
    found = shutil.which("redis-cli")
    if found is None:
        raise LocalClusterError("redis-cli not found (needed for --cluster create)")
    return found


@dataclass
class Node:
    port: int
    bus_port: int
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5.0)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = (self.directory / "redis.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.splitlines()[-lines:])


@dataclass
class LocalRedisCluster:
    root: Path
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 3000
    startup_timeout: float = 30.0
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The store URL of this cluster (docs/cluster.md): one seed node per address."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:2])

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> LocalRedisCluster:
        exe = find_redis_server()
        cli = find_redis_cli(exe)
        try:
            for i in range(self.masters * (1 + self.replicas)):
                self.nodes.append(self._start_node(exe, i))
            create = subprocess.run(
                [cli, "--cluster", "create", *(n.address for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
            )
            if create.returncode != 0:
                raise LocalClusterError(
                    f"redis-cli --cluster create failed: {create.stdout.decode()[-2000:]}"
                    f"{create.stderr.decode()[-2000:]}")
            self.wait_converged()
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)  # also when the session ends without its teardown
        return self

    def _start_node(self, exe: str, i: int) -> Node:
        last = ""
        # A port picked free can be taken before the server binds it: retry with new ones.
        for attempt in range(5):
            port, bus = free_port(HOST), free_port(HOST)
            if bus == port:
                continue
            directory = self.root / f"node{i}-{attempt}"
            directory.mkdir(parents=True)
            argv = [
                exe,
                "--bind", HOST,
                "--port", str(port),
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--save", "",
                "--appendonly", "no",
                # replicas sync at once (the default waits 5 s for more replicas to join)
                "--repl-diskless-sync-delay", "0",
                "--daemonize", "no",
                "--dir", str(directory),
                "--logfile", str(directory / "redis.log"),
            ]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            node = Node(port, bus, directory, proc)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and proc.poll() is None:
                # ours answering, not some other server that already had the port
                if server_pid(HOST, port) == proc.pid:
                    return node
                time.sleep(0.02)
            last = node.log_tail()
            _terminate(proc)
        raise LocalClusterError(f"redis-server node {i} did not start: {last}")

    def stop(self) -> None:
        """Terminate every node (SIGTERM, then SIGKILL after 5 s).  Idempotent."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        nodes, self.nodes = self.nodes, []
        for n in nodes:
            if n.proc.poll() is None:
                n.proc.terminate()
        for n in nodes:
            _terminate(n.proc)

    # -- state --------------------------------------------------------------------------------

    def wait_converged(self, timeout: float | None = None) -> None:
        """Until every node: cluster_state:ok, all nodes known and connected, every slot
        served, every replica's link to its primary up."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        problem = "not checked"
        while time.monotonic() < deadline:
            problem = self._convergence_problem()
            if not problem:
                return
            time.sleep(0.1)
        raise LocalClusterError(f"cluster did not converge: {problem}")

    def _convergence_problem(self) -> str:
        total = len(self.nodes)
        views: dict[str, dict[str, tuple[str, str]]] = {}
        for n in self.nodes:
            if n.proc.poll() is not None:
                return f"node {n.address} exited: {n.log_tail()}"
            try:
                with n.client() as c:
                    info = _fields(c.execute_command("CLUSTER INFO"))
                    if info.get("cluster_state") != "ok":
                        return f"{n.address}: cluster_state {info.get('cluster_state')}"
                    if int(info.get("cluster_known_nodes", 0)) != total:
                        return f"{n.address}: knows {info.get('cluster_known_nodes')} nodes"
                    if int(info.get("cluster_slots_ok", 0)) != 16384:
                        return f"{n.address}: slots_ok {info.get('cluster_slots_ok')}"
                    view, problem = _topology(c.execute_command("CLUSTER NODES"))
                    if problem:
                        return f"{n.address}: {problem}"
                    views[n.address] = view
                    repl = c.info("replication")
                    if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                        return f"{n.address}: replica link {repl.get('master_link_status')}"
            except redis.RedisError as e:
                return f"{n.address}: {e}"
        # Every node must know every replica's primary: a primary ignores a manual failover
        # request from a replica it does not know as its own yet.
        first = next(iter(views.values()))
        if any(v != first for v in views.values()):
            return f"nodes disagree on the topology: {views}"
        masters = sum(1 for role, _ in first.values() if role == "master")
        if masters != self.masters:
            return f"{masters} primaries, expected {self.masters}"
        return ""

    def roles(self) -> dict[str, str]:
        """address -> "master" | "slave", as each node reports itself."""
        out: dict[str, str] = {}
        for n in self.nodes:
            with n.client() as c:
                out[n.address] = str(c.info("replication")["role"])
        return out

    def node(self, address: str) -> Node:
        return next(n for n in self.nodes if n.address == address)

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _topology(reply: object) -> tuple[dict[str, tuple[str, str]], str]:
    """A CLUSTER NODES reply (as redis-py parses it) as address -> (role, primary's
    address or "-"), and a problem ("" if none: no node failing, in handshake or
    disconnected)."""
    assert isinstance(reply, dict), reply
    by_id = {str(info["node_id"]): _text(addr) for addr, info in reply.items()}
    view: dict[str, tuple[str, str]] = {}
    for addr, info in reply.items():
        flags = str(info["flags"])
        if "fail" in flags or "handshake" in flags or "noaddr" in flags:
            return {}, f"sees {_text(addr)} as {flags}"
        if not info.get("connected", True):
            return {}, f"not connected to {_text(addr)}"
        role = "master" if "master" in flags else "slave"
        primary = by_id.get(str(info.get("master_id", "-")), "-")
        view[_text(addr)] = (role, primary)
    return view, ""


def _fields(reply: object) -> dict[str, str]:
    """CLUSTER INFO as a dict (redis-py may already have parsed it)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    out: dict[str, str] = {}
    for line in _text(reply).splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out[key.strip()] = val.strip()
    return out
