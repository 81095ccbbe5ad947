-- struct page records, LRU lists and the final release of a page (spec §1, §2.1, §6).
--
-- Every function in this library works on ONE lruvec slot T (see mmsvc/store/keys.py).
-- Records are cached for the duration of one function call (`P`), lruvec metadata in `META`;
-- `commit()` writes back what changed.  A call is atomic, so the cache is exact.

local T = nil          -- hash tag of the lruvec being worked on
local P = {}           -- idx -> decoded record
local PDIRTY = {}      -- idx -> true
local META = nil       -- lruvec metadata (list heads/tails/sizes, counters)
local MDIRTY = {}      -- field -> true
local EV = {}          -- vmstat event deltas
local FREED = 0        -- pages released to the lruvec's frame reserve by this call
local STATS = {offlru = 0, flushes = 0}
local FREE_PUSHES = {}  -- struct page indexes freed by this call

-- Exactly-once execution of the functions that write.  The caller passes a request id as
-- the first argument; the reply is kept next to the data (same slot, same AOF write) for
-- ONCE_TTL_MS, so a call retried after a lost reply (a dropped connection, a Redis restart
-- between the write and the reply) returns the first reply instead of applying twice.
-- An empty id skips the record (callers that may repeat harmlessly).
local ONCE_TTL_MS = 60000
local function register_once(name, fn)
  redis.register_function(name, function(keys, args)
    local rid = table.remove(args, 1)
    if rid == nil or rid == '' then return fn(keys, args) end
    local k = keys[1] .. ':once:' .. rid
    local prev = redis.call('GET', k)
    if prev then return cmsgpack.unpack(prev) end
    local res = fn(keys, args)
    if res == nil then res = false end
    redis.call('SET', k, cmsgpack.pack(res), 'PX', ONCE_TTL_MS)
    return res
  end)
end

-- bit/struct/cjson exist only when a function runs, not while the library loads.
local function band(a, b) return bit.band(a, b) end
local function bor(a, b) return bit.bor(a, b) end
local function bnot(a) return bit.bnot(a) end

local function has(p, f) return band(p.flags, f) ~= 0 end
local function set(p, f) p.flags = bor(p.flags, f) end
local function clr(p, f) p.flags = band(p.flags, bnot(f)) end
local function test_clear(p, f) local was = has(p, f); clr(p, f); return was end
local function test_set(p, f) local was = has(p, f); set(p, f); return was end

local CH = {}           -- chunk number -> chunk string as loaded (records of CHUNK_PAGES pages)
local BATCH = {}        -- "which:cpu" -> entries of this lruvec's part of a CPU's batch
local BDIRTY = {}       -- "which:cpu" -> true when BATCH differs from the store
-- How BATCH differs from the stored list, so that commit() writes only the difference (the
-- whole list rewritten per call was a good part of a one-page fault's cost): entries taken
-- from its front, the stored length, and whether an entry was changed in place.
local BORIG, BTAKEN, BMOD = {}, {}, {}
local BLOADED = {}      -- "which:cpu" -> true once BATCH holds the whole part (batch())
local SINGLES = {}      -- chunk -> records read one by one (a few are cheaper than the chunk)

local function ckey(c) return T .. ':pg:' .. c end

local function begin(tag)
  T = tag; P = {}; PDIRTY = {}; MDIRTY = {}; EV = {}; FREED = 0; CH = {}; SINGLES = {}
  BATCH = {}; BDIRTY = {}; FREE_PUSHES = {}; BORIG = {}; BTAKEN = {}; BMOD = {}; BLOADED = {}
  STATS = {offlru = 0, flushes = 0}
  local raw = redis.call('HGETALL', T .. ':meta')
  META = {}
  for i = 1, #raw, 2 do META[raw[i]] = tonumber(raw[i + 1]) end
end

-- A CPU's batch part, loaded once per call; changes are written back by commit().  In the
-- store an entry is "idx|tag|seq" (mlock batch) or "idx|seq" (lru_add batch); during a call it
-- is a table {idx, tag, seq} (tag false for lru_add), so that entries queued and flushed by
-- the same call are never formatted or parsed (string work was most of a page's cost).
local function entry_decode(e)
  local a, b, c = string.match(e, '^(%d+)|([^|]+)|?(%d*)$')
  if c == '' then return {tonumber(a), false, tonumber(b)} end
  return {tonumber(a), b, tonumber(c)}
end

local function entry_encode(e)
  if e[2] then return e[1] .. '|' .. e[2] .. '|' .. e[3] end
  return e[1] .. '|' .. e[3]
end

-- A batch part is opened with its stored length only (LLEN); its entries are read and
-- decoded when a flush or mark_residue needs them.  Until then BATCH holds just the entries
-- this call queued after the BORIG stored ones: a one-page fault queues an entry without
-- decoding the 14 before it.
local function batch_open(which, cpu)
  local k = which .. ':' .. cpu
  if BATCH[k] == nil then
    BATCH[k] = {}
    BORIG[k] = redis.call('LLEN', T .. ':' .. k)
    BTAKEN[k] = 0
  end
  return k
end

local function batch_len(which, cpu)
  local k = batch_open(which, cpu)
  if BLOADED[k] then return #BATCH[k] end
  return BORIG[k] + #BATCH[k]
end

-- The whole batch part, decoded (stored entries, then those queued by this call).
local function batch(which, cpu)
  local k = batch_open(which, cpu)
  local b = BATCH[k]
  if not BLOADED[k] then
    local stored = {}
    if BORIG[k] > 0 then
      stored = redis.call('LRANGE', T .. ':' .. k, 0, -1)
      for i = 1, #stored do stored[i] = entry_decode(stored[i]) end
    end
    for i = 1, #b do stored[#stored + 1] = b[i] end
    BATCH[k] = stored
    BLOADED[k] = true
    b = stored
  end
  return b, k
end

local function batch_push(which, cpu, idx, tag, seq)
  local k = batch_open(which, cpu)
  local b = BATCH[k]
  b[#b + 1] = {idx, tag, seq}
  BDIRTY[k] = true
end

-- Take the first `count` entries of a batch part.
local function batch_take(which, cpu, count)
  local b, k = batch(which, cpu)
  local taken, rest = {}, {}
  for i = 1, #b do
    if i <= count then taken[i] = b[i] else rest[i - count] = b[i] end
  end
  BATCH[k] = rest
  BDIRTY[k] = true
  BTAKEN[k] = BTAKEN[k] + #taken
  return taken
end

local function meta(f) return META[f] or 0 end
local function meta_set(f, v) META[f] = v; MDIRTY[f] = true end
local function meta_add(f, d) meta_set(f, meta(f) + d) end
local function ev(name, n) EV[name] = (EV[name] or 0) + n end

-- The free struct page indexes of this lruvec, as a stack kept in the store.
local function FREELIST_POP()
  if #FREE_PUSHES > 0 then
    local idx = FREE_PUSHES[#FREE_PUSHES]; FREE_PUSHES[#FREE_PUSHES] = nil; return idx
  end
  local idx = redis.call('RPOP', T .. ':free')
  if idx then return tonumber(idx) end
  idx = meta('top'); meta_set('top', idx + 1)
  return idx
end
local function FREELIST_PUSH(idx) FREE_PUSHES[#FREE_PUSHES + 1] = idx end
local function FREELIST_COMMIT()
  for i = 1, #FREE_PUSHES, 500 do
    redis.call('RPUSH', T .. ':free', unpack(FREE_PUSHES, i, math.min(#FREE_PUSHES, i + 499)))
  end
  FREE_PUSHES = {}
end

local function chunk(c)
  local s = CH[c]
  if s == nil then
    s = redis.call('GET', ckey(c)) or ''
    CH[c] = s
  end
  return s
end

-- The record of page idx; with `optional`, nil (not an error) when it is free or missing:
-- for callers that found the page without holding a reference (isolation by address).
local function pg(idx, optional)
  local p = P[idx]
  if p then return p end
  local c = math.floor(idx / CHUNK_PAGES)
  local off = (idx % CHUNK_PAGES) * RECORD_SIZE
  local s, pos
  if CH[c] == nil and (SINGLES[c] or 0) < 4 then
    SINGLES[c] = (SINGLES[c] or 0) + 1
    s = redis.call('GETRANGE', ckey(c), off, off + RECORD_SIZE - 1)
    pos = 1
  else
    s = chunk(c)
    pos = off + 1
  end
  if #s < pos + RECORD_SIZE - 1 then
    if optional then return nil end
    error('mmsvc: no struct page at index ' .. idx .. ' of ' .. T)
  end
  local f, ref, mc, prev, nxt, mapping, index, aux = struct.unpack(RECORD_FMT, s, pos)
  p = {flags = f, ref = ref, mapcount = mc, prev = prev, next = nxt,
       mapping = mapping, index = index, aux = aux}
  if band(f, PG_INUSE) == 0 then
    if optional then return nil end
    error('mmsvc: page ' .. idx .. ' of ' .. T .. ' is free')
  end
  P[idx] = p
  return p
end

local function dirty(idx) PDIRTY[idx] = true end

local ZERO_RECORD = nil

local function commit()
  -- Pages: rebuild each touched chunk once (one GET and one SET per 256 pages).
  local by_chunk, counts = {}, {}
  for idx in pairs(PDIRTY) do
    local c = math.floor(idx / CHUNK_PAGES)
    local t = by_chunk[c]
    if t == nil then t = {}; by_chunk[c] = t; counts[c] = 0 end
    t[idx % CHUNK_PAGES] = P[idx]
    counts[c] = counts[c] + 1
  end
  if ZERO_RECORD == nil then ZERO_RECORD = string.rep('\0', RECORD_SIZE) end
  for c, recs in pairs(by_chunk) do
    if counts[c] <= 8 then
      -- a few records: write them in place (SETRANGE pads a short string with zeros)
      for i, p in pairs(recs) do
        redis.call('SETRANGE', ckey(c), i * RECORD_SIZE, struct.pack(RECORD_FMT, p.flags, p.ref,
          p.mapcount, p.prev, p.next, p.mapping, p.index, p.aux))
      end
      CH[c] = nil
    else
      local s = chunk(c)
      local have = math.floor(#s / RECORD_SIZE)
      local top = have
      for i in pairs(recs) do if i + 1 > top then top = i + 1 end end
      local parts = {}
      for i = 0, top - 1 do
        local p = recs[i]
        if p then
          parts[#parts + 1] = struct.pack(RECORD_FMT, p.flags, p.ref, p.mapcount, p.prev,
                                          p.next, p.mapping, p.index, p.aux)
        elseif i < have then
          parts[#parts + 1] = string.sub(s, i * RECORD_SIZE + 1, (i + 1) * RECORD_SIZE)
        else
          parts[#parts + 1] = ZERO_RECORD
        end
      end
      s = table.concat(parts)
      CH[c] = s
      redis.call('SET', ckey(c), s)
    end
  end
  for k in pairs(BDIRTY) do
    local key = T .. ':' .. k
    local cur, orig, taken = BATCH[k], BORIG[k], BTAKEN[k]
    local first = 1  -- the first entry of cur the store does not hold
    if not BLOADED[k] then
      -- only queued: cur holds just the new entries (nothing taken or changed in place)
    elseif BMOD[k] or taken >= orig then
      redis.call('DEL', key)
    else
      if taken > 0 then redis.call('LTRIM', key, taken, -1) end
      first = orig - taken + 1
    end
    local b = {}
    for i = first, #cur do b[#b + 1] = entry_encode(cur[i]) end
    for i = 1, #b, 500 do
      redis.call('RPUSH', key, unpack(b, i, math.min(#b, i + 499)))
    end
    if BLOADED[k] then
      BORIG[k] = #cur
    else
      BORIG[k] = orig + #cur
      BATCH[k] = {}
    end
    BTAKEN[k], BMOD[k] = 0, nil
    -- the CPUs with mlock batch entries in this lruvec (mark_residue looks at the others)
    if #b > 0 and string.sub(k, 1, 4) == 'mlb:' then
      redis.call('SADD', T .. ':mlbcpus', string.sub(k, 5))
    end
  end
  FREELIST_COMMIT()
  for name, n in pairs(EV) do meta_add('ev:' .. name, n) end
  local args = {}
  for f in pairs(MDIRTY) do args[#args + 1] = f; args[#args + 1] = META[f] end
  if #args > 0 then redis.call('HSET', T .. ':meta', unpack(args)) end
  PDIRTY = {}; MDIRTY = {}; EV = {}; BDIRTY = {}
end

-- nr_pages of a page: THP heads carry their order in `aux` (bits 0-7).
local function nr_pages(p)
  if has(p, PG_HEAD) then return bit.lshift(1, band(p.aux, 255)) end
  return 1
end

-- spec §1.6.1: page_evictable = not PG_mlocked and mapping not unevictable.
local function evictable(p)
  return not has(p, PG_MLOCKED) and not has(p, PG_UNEVICTABLE_MAPPING)
end

-- spec §1.4.3: the list a page belongs on.
local function page_lru(p)
  if has(p, PG_UNEVICTABLE) then return LRU_UNEVICTABLE end
  local base = has(p, PG_SWAPBACKED) and LRU_INACTIVE_ANON or LRU_INACTIVE_FILE
  if has(p, PG_ACTIVE) then return base + 1 end
  return base
end

-- The metadata fields of each list (size, head, tail), made once: concatenating them per
-- page cost more than the list operation itself.
local NKEY, HKEY, TKEY = {}, {}, {}
for lru = 0, 4 do NKEY[lru] = 'n' .. lru; HKEY[lru] = 'h' .. lru; TKEY[lru] = 't' .. lru end

-- spec §1.4.2/§1.4.4: add at the head; the unevictable "LRU" is a size with no list.
local function list_add(idx, p, lru)
  local n = nr_pages(p)
  meta_add(NKEY[lru], n)
  if lru == LRU_UNEVICTABLE then return end
  local head = META[HKEY[lru]]
  if head == nil then head = -1 end
  p.prev = -1; p.next = head
  if head >= 0 then local h = pg(head); h.prev = idx; dirty(head)
  else meta_set(TKEY[lru], idx) end
  meta_set(HKEY[lru], idx)
  dirty(idx)
end

local function list_del(idx, p, lru)
  meta_add(NKEY[lru], -nr_pages(p))
  if lru == LRU_UNEVICTABLE then return end
  if p.prev >= 0 then local q = pg(p.prev); q.next = p.next; dirty(p.prev)
  else meta_set(HKEY[lru], p.next) end
  if p.next >= 0 then local q = pg(p.next); q.prev = p.prev; dirty(p.next)
  else meta_set(TKEY[lru], p.prev) end
  p.prev = -1; p.next = -1
  dirty(idx)
end

-- spec §1.4.5: move between lists under one lock hold: delete, change flags, add.
local function list_move(idx, p, fn)
  list_del(idx, p, page_lru(p))
  fn(p)
  list_add(idx, p, page_lru(p))
end

-- A new struct page from the lruvec's frame reserve (frames granted by the node, spec §1.1).
local function page_alloc(flags, mapping, index, aux)
  -- a THP head takes 2^order frames (aux bits 0-7 = order)
  local n = 1
  if band(flags, PG_HEAD) ~= 0 then n = bit.lshift(1, band(aux, 255)) end
  if meta('reserve') < n then return nil end
  meta_add('reserve', -n)
  meta_add('used', n)
  local idx = FREELIST_POP()
  local p = {flags = bor(flags, PG_INUSE), ref = 0, mapcount = 0, prev = -1, next = -1,
             mapping = mapping, index = index, aux = aux}
  P[idx] = p
  dirty(idx)
  return idx, p
end

-- spec §6: the final release when the refcount reaches zero.
local function free_page(idx, p)
  if has(p, PG_LRU) then
    list_del(idx, p, page_lru(p))
    clr(p, PG_LRU)
  end
  clr(p, bor(PG_ACTIVE, PG_UNEVICTABLE))
  if test_clear(p, PG_MLOCKED) then
    -- §6.1.2: PG_mlocked found at free: the integrity signal unevictable_pgs_cleared.
    meta_add('nr_mlock', -nr_pages(p))
    ev('unevictable_pgs_cleared', nr_pages(p))
  end
  if has(p, PG_ISOLATED) then error('mmsvc: freeing an isolated page ' .. idx) end
  local n = nr_pages(p)
  p.flags = 0; p.mapcount = 0; p.prev = -1; p.next = -1; p.aux = 0
  dirty(idx)
  FREELIST_PUSH(idx)
  meta_add('used', -n)
  meta_add('reserve', n)
  FREED = FREED + n
end

local function get_page(idx, n)
  local p = pg(idx); p.ref = p.ref + (n or 1); dirty(idx); return p
end

local function put_page(idx, n)
  local p = pg(idx)
  p.ref = p.ref - (n or 1)
  dirty(idx)
  if p.ref < 0 then error('mmsvc: refcount underflow on page ' .. idx .. ' of ' .. T) end
  if p.ref == 0 then free_page(idx, p) end
end
