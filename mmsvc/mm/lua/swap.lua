-- mm/swap.c: the per-CPU lru_add batch and its flush (spec §2.1).
--
-- A CPU's batch is one ordered list of entries across lruvecs; each lruvec slot holds its part
-- as the list T:lab:<cpu> of "idx|seq" (seq orders entries across lruvecs).  The worker keeps
-- the run order in memory and can rebuild it from the seq numbers.

local CFG = {}   -- per call: batch lengths and tunables passed by the caller

-- spec §2.1.4 / §8.2: lru-add of one page.
local function lru_add_one(idx)
  local p = pg(idx)
  local was_unevictable = test_clear(p, PG_UNEVICTABLE)
  set(p, PG_LRU)
  local n = nr_pages(p)
  if evictable(p) then
    if was_unevictable then ev('unevictable_pgs_rescued', n) end
  else
    clr(p, PG_ACTIVE)
    set(p, PG_UNEVICTABLE)
    if not was_unevictable then ev('unevictable_pgs_culled', n) end
  end
  list_add(idx, p, page_lru(p))
  if has(p, PG_UNEVICTABLE) then
    -- §8.2: lru-add initialises mlock_count to 0 (10/13), or !!PG_mlocked (v1 06/13).
    if CFG.init_lru_add_bool == 1 and has(p, PG_MLOCKED) then p.prev = 1 else p.prev = 0 end
  end
  dirty(idx)
end

-- Process the first `count` entries of this lruvec's part of cpu's lru_add batch.
local function lru_add_flush(cpu, count)
  local entries = batch_take('lab', cpu, count)
  for _, e in ipairs(entries) do lru_add_one(e[1]) end
  -- §2.1.4: after the loop, unlock, then drop each entry's reference.
  return entries
end

local function drop_entry_refs(entries)
  for _, e in ipairs(entries) do put_page(e[1], 1) end
end

-- spec §2.1.3: lru_cache_add takes a reference and queues the page.
local function lru_cache_add(idx, cpu, seq)
  local p = get_page(idx, 1)
  if has(p, PG_LRU) then error('mmsvc: lru_cache_add of a page already on the LRU') end
  batch_push('lab', cpu, idx, false, seq)
  return p
end
