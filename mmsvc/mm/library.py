"""The Redis function library: the emulated kernel's per-page code, run next to the data.

One Lua file per kernel counterpart (``lua/page.lua`` = struct page and the LRU lists,
``lua/swap.lua`` = mm/swap.c, ``lua/mlock.lua`` = mm/mlock.c,
``lua/huge_memory.lua`` = split_huge_page's struct page side, ``lua/shm.lua`` = ipc/shm.c and
SHM_LOCK's page work, ``lua/memory.lua`` = the page side
of mm/memory.c and mm/rmap.c, ``lua/locks.lua`` = the instrumented locks).  They are
concatenated, after constants rendered from :mod:`mmsvc.mm.page`, into one Redis Functions
library, so they share helpers and each function touches the keys of one slot only.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from mmsvc.mm.page import lua_header

LIBRARY_NAME = "mmsvc"
_ORDER = ("page.lua", "locks.lua", "swap.lua", "mlock.lua", "shm.lua", "huge_memory.lua",
          "memory.lua", "filemap.lua", "swapfile.lua")


@cache
def library_source() -> str:
    parts = []
    for name in _ORDER:
        text = resources.files("mmsvc.mm").joinpath("lua", name).read_text(encoding="utf-8")
        parts.append(f"-- ==== {name} ====\n{text}")
    body = lua_header() + "\n".join(parts)
    digest = hashlib.sha1(body.encode()).hexdigest()[:12]
    return f"#!lua name={LIBRARY_NAME}\n-- build {digest}\n{body}"
