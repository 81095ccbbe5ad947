"""Redis Cluster access for the page store (docs/cluster.md).

A store URL names a cluster by its scheme::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?option=value...]
    rediss+cluster://...                                          (TLS)

Everything but the scheme and the list of seed nodes is read the way redis-py reads a
``redis://`` / ``rediss://`` URL (credentials, ``ssl_*`` and socket options in the query).  The
seed nodes only bootstrap discovery: the client learns the whole topology (primaries, replicas,
slot ranges) from any of them and follows MOVED/ASK redirections afterwards.  A cluster has only
database 0.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis._parsers import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, RedisCluster

#: scheme of a cluster URL -> the redis-py scheme of the same transport
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """(a redis-py URL of the first seed with every option, all seeds as (host, port)).

    Raises ValueError for anything that is not a usable cluster URL.
    """
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(
            f"not a cluster URL (redis+cluster:// or rediss+cluster://): {_safe(url)!r}")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    seeds: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if not item:
            raise ValueError(f"empty seed node in cluster URL {_safe(url)!r}")
        seed = urlsplit(f"//{item}")
        try:
            port = seed.port or DEFAULT_PORT
        except ValueError as exc:
            raise ValueError(f"bad port in seed node {item!r} of {_safe(url)!r}") from exc
        if not seed.hostname:
            raise ValueError(f"seed node {item!r} of {_safe(url)!r} has no host")
        seeds.append((seed.hostname, port))
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0, not {parts.path!r}")
    first = hostlist.split(",", 1)[0]
    single = urlunsplit((scheme, f"{userinfo}{at}{first}", "", parts.query, ""))
    return single, seeds


class _KeyedFcallParser(AsyncCommandsParser):
    """Finds FCALL's keys in its own arguments (``FCALL name numkeys key...``).

    redis-py routes every command by the slot of its keys.  FCALL is flagged "movablekeys",
    so the stock parser asks a server (COMMAND GETKEYS) for them, and does so twice per call:
    two extra round trips, all to one node, on the store's hottest path.
    """

    async def get_keys(self, *args: Any) -> tuple[str, ...] | None:
        if len(args) >= 3 and str(args[0]).upper() in ("FCALL", "FCALL_RO"):
            numkeys = int(args[2])
            keys = tuple(args[3:3 + numkeys])
            return keys or None
        return await super().get_keys(*args)


def _safe(url: str) -> str:
    """The URL without its password (error messages end up in logs)."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def cluster_client(url: str, *, max_connections: int) -> RedisCluster:
    """An unconnected RedisCluster client for a cluster URL (raw bytes replies)."""
    single, seeds = parse_cluster_url(url)
    client = RedisCluster.from_url(
        single,
        # the first seed comes from the URL itself; the others are extra startup nodes
        startup_nodes=[ClusterNode(host, port) for host, port in seeds[1:]],
        decode_responses=False,
        max_connections=max_connections,
    )
    client.commands_parser = _KeyedFcallParser()
    return client
