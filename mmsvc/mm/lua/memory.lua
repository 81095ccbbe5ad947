-- mm/memory.c + mm/rmap.c, page side: the per-lruvec "page program" that faults, maps, unmaps
-- and queues pages in one round trip, and the page-table functions of an address space.

-- Flush this lruvec's part of cpu's batch `which` ('mlb' or 'lab') holding the lruvec lock,
-- then drop the entries' references after unlocking (spec §2.3, §2.1.4).
local function flush_run(which, cpu, count)
  local entries
  if which == 'mlb' then entries = mlock_flush(cpu, count) else entries = lru_add_flush(cpu, count) end
  STATS.flushes = STATS.flushes + 1
  return entries
end

-- tok: the caller holds the lruvec lock (queued acquisition): check it (fencing).
-- Otherwise take it inline; nil, 'locked' when someone else holds or awaits it.
local function locked_flush(which, cpu, count, tok)
  local L = T .. ':lock'
  local entries
  if tok then
    if not lk_holds(L, tok) then return nil, 'fenced' end
    entries = flush_run(which, cpu, count)
  elseif INSIDE then
    entries = flush_run(which, cpu, count)  -- already inside a critical section of this call
  else
    if not ilock_enter(L, cpu) then return nil, 'locked' end
    entries = flush_run(which, cpu, count)
    ilock_exit()
  end
  -- after unlock: the batch's references go (this may free pages, §6)
  if which == 'mlb' then
    for _, e in ipairs(entries) do put_page(e[1], 1) end
  else
    drop_entry_refs(entries)
  end
  return #entries, nil
end

local function result(extra)
  if INSIDE then ilock_exit() end
  ilock_commit()
  commit()
  extra.freed = FREED
  extra.reserve = meta('reserve')
  extra.flushes = STATS.flushes
  extra.offlru = STATS.offlru
  return cjson.encode(extra)
end

-- mm_pages(T; hdr_json, ops_json): run a program of page operations on one lruvec.
-- hdr: cpu, mlb_max, lab_max, mlb_n, lab_n (entries pending on cpu in all lruvecs),
--      mlb_local, lab_local (1 if all of them are in T), seq, disabled, init_* tunables.
-- ops: {"A",flags,mapping,index,aux} alloc | {"M",i} map | {"U",i} unmap | {"G",i} get |
--      {"P",i} put | {"L",i} mlock_page | {"N",i} mlock_new_page | {"K",i} munlock_page |
--      {"C",i} lru_cache_add | {"F",i,set,clear} flags | {"shm",i,fid,index,lock} SHM_(UN)LOCK
--      (lua/shm.lua).  i < 0 names the -i'th page allocated
--      by this call.  Stops early (reason) when a batch must be flushed across lruvecs or the
--      lruvec lock is taken; `done` ops have been applied.
-- The page a range walk read from a pte is still that page: in use, at the same index, and
-- anonymous (a private copy) or a page of the VMA's file (mapping; -1: the VMA has none).
local function walk_target(idx, index, mapping)
  local p = pg(idx, true)
  if p == nil then return false end
  -- a KSM page keeps the index of the page it was made from: mapped at another address its
  -- index is not this one's (its mapping is its stable node, mm/ksm.py)
  if has(p, PG_KSM) then return true end
  if p.index ~= index then return false end
  return has(p, PG_ANON) or (mapping >= 0 and p.mapping == mapping)
end

local function mm_pages_body(keys, args)
  begin(keys[1])
  ILK = nil; INSIDE = false
  local h = cjson.decode(args[1])
  local ops = cjson.decode(args[2])
  CFG = h
  local cpu, seq = h.cpu, h.seq
  local mlb_n, lab_n = h.mlb_n, h.lab_n
  local allocs = {}
  -- a CPU taken offline as dead (its lease ran out while it was paused) touches no page
  if redis.call('EXISTS', T .. ':offline:' .. cpu) == 1 then
    return result({done = 0, reason = 'offline', alloc = allocs, mlb_n = mlb_n, lab_n = lab_n,
                   seq = seq})
  end
  local need = 0
  for _, op in ipairs(ops) do
    if op[1] == 'A' then
      if bit.band(op[2], PG_HEAD) ~= 0 then need = need + bit.lshift(1, bit.band(op[5], 255))
      else need = need + 1 end
    end
  end
  if need > meta('reserve') then
    return result({done = 0, reason = 'reserve', need = need, alloc = allocs,
                   mlb_n = mlb_n, lab_n = lab_n, seq = seq})
  end
  -- A mirror that disagrees with the store (another CPU drained this one as offline, or
  -- the worker restarted) is reloaded by the caller before anything is done.
  if (h.mlb_local == 1 and batch_len('mlb', cpu) ~= mlb_n)
      or (h.lab_local == 1 and batch_len('lab', cpu) ~= lab_n) then
    return result({done = 0, reason = 'stale', alloc = allocs, mlb_n = mlb_n, lab_n = lab_n,
                   seq = seq})
  end
  local function ix(i) if i < 0 then return allocs[-i] end return i end
  local done, reason = 0, nil
  local isolated, failed = {}, {}
  -- The lruvec lock, when this program holds it: taken inline by the first isolation, or
  -- held by the caller (queued acquisition) and passed as h.tok (checked: fencing).
  local held, external = nil, false
  if h.tok and h.tok > 0 then
    if not lk_holds(T .. ':lock', h.tok) then
      return result({done = 0, reason = 'fenced', alloc = allocs, mlb_n = mlb_n,
                     lab_n = lab_n, seq = seq})
    end
    held, external = h.tok, true
  end
  -- lru_cache_add from this program (§2.1.3): flush the lru_add batch when it is full, on a
  -- THP head or while lru_cache_disabled, here if all its entries are in this lruvec
  local function lab_add(idx)
    local p = lru_cache_add(idx, cpu, seq)
    seq = seq + 1
    lab_n = lab_n + 1
    if lab_n >= h.lab_max or has(p, PG_HEAD) or h.disabled == 1 then
      if h.lab_local == 1 then
        local n, why = locked_flush('lab', cpu, lab_n, external and held or nil)
        if n then lab_n = 0 else reason = 'lab_' .. why end
      else reason = 'lab' end
    end
    return p
  end
  for k, op in ipairs(ops) do
    local c = op[1]
    local thp = false
    if c == 'A' then
      local idx = page_alloc(op[2], op[3], op[4], op[5])
      allocs[#allocs + 1] = idx
    elseif c == 'M' then
      local p = get_page(ix(op[2]), 1); p.mapcount = p.mapcount + 1
    elseif c == 'U' then
      local p = pg(ix(op[2])); p.mapcount = p.mapcount - 1; dirty(ix(op[2]))
      if p.mapcount < 0 then error('mmsvc: mapcount underflow') end
    elseif c == 'm' or c == 'u' then
      -- a pte mapping of a THP subpage added / removed: counted apart from pmd mappings,
      -- never mlocked (§3.9: "count the pmds and ignore the ptes").
      local idx = ix(op[2])
      local p = pg(idx)
      local d = (c == 'm') and 1 or -1
      local ptemaps = bit.rshift(p.aux, AUX_PTEMAP_SHIFT) + d
      if ptemaps < 0 then error('mmsvc: THP pte mapcount underflow') end
      p.aux = bit.bor(bit.band(p.aux, 255), bit.lshift(ptemaps, AUX_PTEMAP_SHIFT))
      dirty(idx)
      if c == 'm' then get_page(idx, 1) end
    elseif c == 'G' then get_page(ix(op[2]), 1)
    elseif c == 'T' then
      -- {"T", idx, mapping, index, lock}: a page found in the page cache, where the lookup
      -- held no reference (filemap_get_entry + folio_try_get_rcu + the re-check of
      -- folio->mapping and index): take a reference unless the page was freed, frozen
      -- (__remove_mapping, migration) or reused meanwhile; lock = 1 also trylocks it
      -- (PG_locked: filemap_fault's lock_page, filemap_map_pages' trylock).  {"T", ..., head}:
      -- the slot named a file THP (head = 1: index is the head's) or a small page (0); a page
      -- that is no longer that (a THP split meanwhile) fails too.  A failed lookup is
      -- reported in `failed` and the program goes on.
      local idx = op[2]
      local p = pg(idx, true)
      if p == nil or not has(p, PG_PAGECACHE) or has(p, PG_ANON) or has(p, PG_FROZEN)
          or p.mapping ~= op[3] or p.index ~= op[4] or (op[5] == 1 and has(p, PG_LOCKED))
          or (op[6] ~= nil and (op[6] == 1) ~= has(p, PG_HEAD)) then
        failed[#failed + 1] = idx
      else
        if op[5] == 1 then set(p, PG_LOCKED) end
        get_page(idx, 1)
      end
    elseif c == 'O' then
      -- trylock_page on a page the caller holds a reference to; `failed` when locked.
      local idx = ix(op[2])
      local p = pg(idx)
      if has(p, PG_LOCKED) then failed[#failed + 1] = idx
      else set(p, PG_LOCKED); dirty(idx) end
    elseif c == 'R' then
      -- {"R", idx, expected}: folio_ref_freeze - succeeds only when exactly `expected`
      -- references exist (the caller's isolation and the page cache's); then lookups
      -- without a reference fail.  Otherwise the program stops here: reason 'unfrozen'.
      local idx = ix(op[2])
      local p = pg(idx)
      if p.ref ~= op[3] then
        failed[#failed + 1] = idx
        reason = 'unfrozen'
      else
        set(p, PG_FROZEN); dirty(idx)
      end
    elseif c == 'pin' then
      -- {"pin", idx, n}: mm/gup.c try_grab_folio(FOLL_PIN): n references (a small page:
      -- GUP_PIN_COUNTING_BIAS, a THP head: 1 + its pincount, kept by mm/gup.py).  Like
      -- folio_try_get it fails on a page that is free or frozen (refcount 0): `failed`.
      local idx = op[2]
      local p = pg(idx, true)
      if p == nil or not has(p, PG_INUSE) or has(p, PG_FROZEN) or p.ref <= 0 then
        failed[#failed + 1] = idx
      else
        get_page(idx, op[3])
      end
    elseif c == 'unpin' then
      -- {"unpin", idx, n}: unpin_user_page: the pin's references go; the last one frees the
      -- page with the final clearance of §6 (a pinned page may keep PG_mlocked until then, X1)
      put_page(op[2], op[3])
    elseif c == 'J' then
      -- {"J", idx, mapcount, ptemaps, refcount, clear}: recovery after a CPU died in the
      -- middle of syscalls (mm/recovery.py, run while the machine is stopped): the counts
      -- recomputed from the page tables, page cache and batches; flags `clear` dropped
      -- (stale page locks, freezes, isolations).  A page nobody references is freed.
      local idx = op[2]
      local p = pg(idx)
      clr(p, op[6])
      p.mapcount = op[3]
      if has(p, PG_HEAD) then
        p.aux = bit.bor(bit.band(p.aux, 255), bit.lshift(op[4], AUX_PTEMAP_SHIFT))
      end
      dirty(idx)
      if op[5] <= 0 then
        p.ref = 1
        put_page(idx, 1)
      else
        p.ref = op[5]
      end
    elseif c == 'P' then put_page(ix(op[2]), 1)
    elseif c == 'I' then
      -- isolate_lru_page (§2.1.1): test-and-clear PG_lru, then under the lruvec lock.
      local idx = ix(op[2])
      local p = pg(idx, true)
      if p == nil or not has(p, PG_LRU) then
        failed[#failed + 1] = idx
      else
        if not held then held = ilock_enter(T .. ':lock', cpu) end
        if not held then reason = 'lru_locked'; done = k - 1; break end
        clr(p, PG_LRU)
        list_del(idx, p, page_lru(p))
        set(p, PG_ISOLATED)
        if op[3] == 1 then set(p, PG_USER_ISOLATED) end  -- isolated by the Isolate API
        get_page(idx, 1)
        isolated[#isolated + 1] = idx
      end
    elseif c == 'S' then
      -- isolate_lru_folios (reclaim): up to op[3] pages from the tail of list op[2].
      if not held then held = ilock_enter(T .. ':lock', cpu) end
      if not held then reason = 'lru_locked'; done = k - 1; break end
      local lru, want = op[2], op[3]
      local n = 0
      while n < want do
        local idx = META['t' .. lru]
        if idx == nil or idx < 0 then break end
        local p = pg(idx)
        clr(p, PG_LRU)
        list_del(idx, p, lru)
        set(p, PG_ISOLATED)
        get_page(idx, 1)
        isolated[#isolated + 1] = idx
        n = n + 1
      end
    elseif c == 'B' and op[4] == 1 and not (pg(ix(op[2]), true) ~= nil
                                          and has(pg(ix(op[2])), PG_USER_ISOLATED)) then
      -- {"B", idx, active, 1}: the Putback API's putback, only of a page the Isolate API
      -- isolated and nobody put back since (a racing Putback of the same page): else `failed`
      failed[#failed + 1] = ix(op[2])
    elseif c == 'B' then
      -- putback_lru_page (§2.1.2): lru_cache_add, then drop the isolation reference.
      local idx = ix(op[2])
      local p = pg(idx)
      clr(p, PG_ISOLATED)
      clr(p, PG_USER_ISOLATED)
      if op[3] == 1 then set(p, PG_ACTIVE) end
      dirty(idx)
      lab_add(idx)
      put_page(idx, 1)
    elseif c == 'D' or c == 'Z' then
      -- D: deactivate (MADV_COLD); Z: lazyfree (MADV_FREE: anon -> inactive file list).
      -- The kernel queues these in per-CPU batches drained with the others; applied at once
      -- here, under the lruvec lock.
      local idx = ix(op[2])
      local p = pg(idx, true)
      if p ~= nil and has(p, PG_LRU) and not has(p, PG_UNEVICTABLE) then
        if not held then held = ilock_enter(T .. ':lock', cpu) end
        if not held then reason = 'lru_locked'; done = k - 1; break end
        if c == 'D' then
          list_move(idx, p, function(q) clr(q, PG_ACTIVE); clr(q, PG_REFERENCED) end)
        elseif has(p, PG_ANON) and has(p, PG_SWAPBACKED) then
          list_move(idx, p, function(q) clr(q, PG_ACTIVE); clr(q, PG_SWAPBACKED) end)
        end
      end
    elseif c == 'X' then
      -- legacy new anon page in a VM_LOCKED vma (§9.3.3): PG_mlocked now, culled at lru-add.
      local p = pg(ix(op[2]))
      if not test_set(p, PG_MLOCKED) then
        meta_add('nr_mlock', nr_pages(p)); ev('unevictable_pgs_mlocked', nr_pages(p))
      end
      dirty(ix(op[2]))
    elseif c == 'Y' and op[3] ~= nil and not walk_target(ix(op[2]), op[3], op[4]) then
      -- {"Y", idx, index, mapping}: legacy FOLL_MLOCK populate's page read from a pte, freed
      -- or reused since (see 'L' below): skipped
      failed[#failed + 1] = ix(op[2])
    elseif c == 'Y' then
      -- legacy mlock_vma_page (§9.2), page locked by the caller: if the test-and-set wins,
      -- count, then isolate and put back (lru-add culls it).
      local idx = ix(op[2])
      local p = pg(idx)
      dirty(idx)
      if not test_set(p, PG_MLOCKED) then
        meta_add('nr_mlock', nr_pages(p)); ev('unevictable_pgs_mlocked', nr_pages(p))
        if has(p, PG_LRU) then
          if not held then held = ilock_enter(T .. ':lock', cpu) end
          if not held then reason = 'lru_locked'; done = k - 1; break end
          clr(p, PG_LRU)
          list_del(idx, p, page_lru(p))
          lab_add(idx)  -- putback_lru_page: the isolation ref becomes the entry's
        end
      end
    elseif c == 'W' and op[3] ~= nil and not walk_target(ix(op[2]), op[3], op[4]) then
      -- {"W", idx, index, mapping}: the legacy munlock walk's page, freed or reused since its
      -- pte was read (follow_page takes it with a reference under the PTL): skipped
      failed[#failed + 1] = ix(op[2])
    elseif c == 'W' then
      -- legacy munlock_vma_pages_range phase 1 (§9.4.4), under the lruvec lock.
      local idx = ix(op[2])
      local p = pg(idx)
      if not held then held = ilock_enter(T .. ':lock', cpu) end
      if not held then reason = 'lru_locked'; done = k - 1; break end
      dirty(idx)
      if test_clear(p, PG_MLOCKED) then
        clr(p, PG_RESTORED_MLOCKED)
        meta_add('nr_mlock', -nr_pages(p))
        if has(p, PG_LRU) then
          clr(p, PG_LRU)
          list_del(idx, p, page_lru(p))
          set(p, PG_ISOLATED)
          get_page(idx, 1)
          isolated[#isolated + 1] = idx
        elseif has(p, PG_UNEVICTABLE) then ev('unevictable_pgs_stranded', nr_pages(p))
        else ev('unevictable_pgs_munlocked', nr_pages(p)) end
      end
    elseif c == 'V' then
      -- legacy phase 2 fast path + phase 3: straight back to an evictable list.
      local idx = ix(op[2])
      local p = pg(idx)
      if not held then held = ilock_enter(T .. ':lock', cpu) end
      if not held then reason = 'lru_locked'; done = k - 1; break end
      clr(p, PG_ISOLATED)
      local was_unev = test_clear(p, PG_UNEVICTABLE)
      list_add(idx, p, page_lru(p))
      set(p, PG_LRU)
      ev('unevictable_pgs_munlocked', nr_pages(p))
      if was_unev then ev('unevictable_pgs_rescued', nr_pages(p)) end
      put_page(idx, 1)
    elseif c == 'E' then
      -- legacy __munlock_isolated_page: "if the page is still not PG_mlocked count MUNLOCKED"
      local p = pg(ix(op[2]))
      if not has(p, PG_MLOCKED) then ev('unevictable_pgs_munlocked', nr_pages(p)) end
    elseif c == 'Q' then
      -- clear_page_mlock (§9.8) when the last mapping went (page_remove_rmap): legacy, and
      -- the rework with final_clearance = mapcount_zero (§6.2).  The lruvec lock is taken
      -- before anything changes, so a retry after 'lru_locked' finds the page as it was.
      local idx = ix(op[2])
      local p = pg(idx)
      if p.mapcount == 0 and has(p, PG_MLOCKED) then
        if has(p, PG_LRU) and not held then held = ilock_enter(T .. ':lock', cpu) end
        if has(p, PG_LRU) and not held then reason = 'lru_locked'; done = k - 1; break end
        clr(p, bor(PG_MLOCKED, PG_RESTORED_MLOCKED))
        dirty(idx)
        meta_add('nr_mlock', -nr_pages(p)); ev('unevictable_pgs_cleared', nr_pages(p))
        if has(p, PG_LRU) then
          clr(p, PG_LRU)
          list_del(idx, p, page_lru(p))
          lab_add(idx)
        elseif has(p, PG_UNEVICTABLE) then
          ev('unevictable_pgs_stranded', nr_pages(p))
        end
      end
    elseif c == 'shm' then
      -- {"shm", idx, fid, index, lock}: SHM_LOCK / SHM_UNLOCK reaching a page of the segment's
      -- page cache (lua/shm.lua): lock = 1 marks it PG_UNEVICTABLE_MAPPING and moves nothing
      -- (reclaim or lru-add culls it later); lock = 0 clears the mark, then
      -- check_move_unevictable_folios.  A page gone meanwhile is reported in `failed`.
      local idx = op[2]
      local p = shm_cache_page(idx, op[3], op[4])
      if p == nil then
        failed[#failed + 1] = idx
      elseif op[5] == 1 then
        set(p, PG_UNEVICTABLE_MAPPING); dirty(idx)
      else
        if has(p, PG_LRU) and not held then held = ilock_enter(T .. ':lock', cpu) end
        if has(p, PG_LRU) and not held then reason = 'lru_locked'; done = k - 1; break end
        clr(p, PG_UNEVICTABLE_MAPPING); dirty(idx)
        check_move_unevictable_page(idx, p)
      end
    elseif c == 'ksm' then
      -- {"ksm", idx, mapping, on}: mm/ksm.c set_page_stable_node: on = 1, the anonymous page
      -- becomes a KSM page whose mapping is its stable node (mmsvc/mm/ksm.py), dirty as ksmd
      -- marks it; on = 0 undoes that (a merge that failed half-way: its anon_vma back)
      local idx = ix(op[2])
      local p = pg(idx)
      if op[4] == 1 then set(p, bor(PG_KSM, PG_DIRTY)) else clr(p, PG_KSM) end
      p.mapping = op[3]; dirty(idx)
    elseif c == 'split' then
      -- {"split", head}: __split_huge_page (lua/huge_memory.lua); the tails' records are
      -- reported in `alloc` in subpage order 1 .. nr-1 (no frames taken: the THP's own)
      local tails = split_huge_page_records(ix(op[2]))
      for i = 1, #tails do allocs[#allocs + 1] = tails[i] end
    elseif c == 'F' then
      local p = pg(ix(op[2])); set(p, op[3]); clr(p, op[4]); dirty(ix(op[2]))
    elseif (c == 'L' or c == 'K') and op[3] ~= nil and not walk_target(ix(op[2]), op[3], op[4]) then
      -- {"L"|"K", idx, index, mapping}: a page an mlock/munlock range walk read from a pte.
      -- mlock_pte_range works under the page table lock, so an rmap walker (reclaim,
      -- migration, truncation) that zapped the pte meanwhile leaves it nothing to do: a page
      -- freed or reused since the pte was read is skipped (`failed`), never touched.
      failed[#failed + 1] = ix(op[2])
    elseif c == 'L' or c == 'N' or c == 'K' then
      local p
      if c == 'L' then p = mlock_page(ix(op[2]), cpu, seq)
      elseif c == 'N' then p = mlock_new_page(ix(op[2]), cpu, seq)
      else p = munlock_page(ix(op[2]), cpu, seq) end
      seq = seq + 1
      mlb_n = mlb_n + 1
      thp = has(p, PG_HEAD)
      -- §2.2.1.3: flush when full, on a THP head, or while lru_cache_disabled.
      if mlb_n >= h.mlb_max or thp or h.disabled == 1 then
        if h.mlb_local == 1 then
          local n, why = locked_flush('mlb', cpu, mlb_n, external and held or nil)
          if n then mlb_n = 0 else reason = 'mlb_' .. why end
        else reason = 'mlb' end
      end
    elseif c == 'C' then
      lab_add(ix(op[2]))
    else
      error('mmsvc: unknown page op ' .. tostring(c))
    end
    done = k
    if reason then break end
  end
  return result({done = done, reason = reason, alloc = allocs, mlb_n = mlb_n, lab_n = lab_n,
                 seq = seq, isolated = isolated, failed = failed})
end
register_once('mm_pages', mm_pages_body)

-- mm_flush(T; which, cpu, count, tok): flush this lruvec's run of `count` entries of cpu's
-- batch.  tok = 0: take the lruvec lock inline if it is free; otherwise the caller holds it
-- (queued acquisition) and tok is checked against its holders (fencing).
register_once('mm_flush', function(keys, args)
  begin(keys[1])
  ILK = nil; INSIDE = false
  CFG = cjson.decode(args[5] or '{}')
  local which, cpu, count, tok = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  if tok == 0 then tok = nil end
  local n, why = locked_flush(which, cpu, count, tok)
  return result({done = n or 0, reason = why})
end)

-- mm_grant(T; n): frames granted by the node to this lruvec's reserve (or returned: n < 0).
register_once('mm_grant', function(keys, args)
  local n = tonumber(args[1])
  local r = redis.call('HINCRBY', keys[1] .. ':meta', 'reserve', n)
  if r < 0 then
    redis.call('HINCRBY', keys[1] .. ':meta', 'reserve', -n)
    return redis.error_reply('EINVAL reserve would go negative')
  end
  return r
end)

-- mm_records(T; idx...) -> raw 32-byte records (views and the checker).
redis.register_function{function_name = 'mm_records', flags = {'no-writes'},
  callback = function(keys, args)
    local out = {}
    for i, a in ipairs(args) do
      local idx = tonumber(a)
      local off = (idx % CHUNK_PAGES) * RECORD_SIZE
      out[i] = redis.call('GETRANGE', keys[1] .. ':pg:' .. math.floor(idx / CHUNK_PAGES),
        off, off + RECORD_SIZE - 1)
    end
    return out
  end}

-- ---------------------------------------------------------------- page tables (mm slot) ----
-- M:pt:<pmd> is a 512-entry string of PTE_FMT entries (idx, lruvec id, bits).

local function pte_key(M, vpn) return M .. ':pt:' .. math.floor(vpn / PTRS_PER_PMD) end

-- pt_read(M; v0, v1) -> flat {vpn, idx, lv, bits, ...} for present ptes in [v0, v1).
-- Empty page tables are skipped at no cost per address (spec §3.6.3, S26).
-- (Read-only: views and walkers that only look; the PTL is accounted by pt_walk.)
redis.register_function{function_name = 'pt_read', flags = {'no-writes'},
  callback = function(keys, args)
    return pt_read_range(keys[1], tonumber(args[1]), tonumber(args[2]), false)
  end}

-- pt_walk(M; v0, v1[, max]): pt_read for a walk that holds each page table's lock
-- (mlock_pte_range, zap, fault), with the PTL accounted.  With max: {resume_vpn, ptes...}.
register_once('pt_walk', function(keys, args)
  local out, resume = pt_read_range(keys[1], tonumber(args[1]), tonumber(args[2]), true,
                                    tonumber(args[3]))
  if args[3] then table.insert(out, 1, resume) end
  return out
end)

local function pt_store(M, vpn, idx, lv, bits)
  local key = pte_key(M, vpn)
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, string.rep('\0', PTRS_PER_PMD * PTE_SIZE))
    local pmd = math.floor(vpn / PTRS_PER_PMD)
    redis.call('ZADD', M .. ':pmds', pmd, pmd)  -- __pte_alloc
  end
  redis.call('SETRANGE', key, (vpn % PTRS_PER_PMD) * PTE_SIZE, struct.pack(PTE_FMT, idx, lv, bits))
end

local function pt_load(M, vpn)
  local off = (vpn % PTRS_PER_PMD) * PTE_SIZE
  local s = redis.call('GETRANGE', pte_key(M, vpn), off, off + PTE_SIZE - 1)
  if #s < PTE_SIZE then return 0, 0, 0 end
  return struct.unpack(PTE_FMT, s)
end

-- pt_install(M; flat {vpn, idx, lv, bits, expect_idx, expect_lv, expect_bits}...): set ptes
-- whose current value is the expected one (0,0,0 = none); returns the vpns that differed.
-- A pmd mapped by a huge pmd (M:hpmd) is not pmd_none: no pte goes under it (a fault that
-- read the ptes before another thread mapped the pmd backs off and finds the pmd).
local function pt_install_impl(M, args, first)
  local conflicts = {}
  local t0, tables, seen = redis.call('TIME'), 0, {}
  for i = first, #args, 7 do
    local pmd = math.floor(tonumber(args[i]) / PTRS_PER_PMD)
    if seen[pmd] == nil then
      seen[pmd] = redis.call('EXISTS', M .. ':hpmd:' .. pmd) == 1
      tables = tables + 1
    end
    local vpn = tonumber(args[i])
    local cidx, clv, cbits = pt_load(M, vpn)
    if not seen[pmd] and cidx == tonumber(args[i + 4]) and clv == tonumber(args[i + 5])
        and cbits == tonumber(args[i + 6]) then
      pt_store(M, vpn, tonumber(args[i + 1]), tonumber(args[i + 2]), tonumber(args[i + 3]))
    else
      conflicts[#conflicts + 1] = vpn
    end
  end
  ptl_account(M, tables, t0)
  return conflicts
end

register_once('pt_install', function(keys, args)
  return pt_install_impl(keys[1], args, 1)
end)

-- ttu_pte(M; vpn, vma_id, stop_mask, idx, lv, bits, exp_idx, exp_lv, exp_bits)
--   -> {status, vma_json}
-- An rmap walker's step under the PTL (try_to_unmap_one, try_to_migrate_one,
-- remove_migration_pte): the vma's flags are read with the pte, so the flags seen before the
-- change (reclaim: a VM_LOCKED vma stops the walk, §5.3) and after it (the munlock hook of
-- page_remove_rmap) are one read; then the pte is replaced if it is still the one expected.
-- status 0: replaced, 1: the pte changed (raced), 2: the vma has a flag of stop_mask
-- (nothing done), 3: the vma no longer covers vpn (split or moved: the caller looks it up
-- and goes the slow way).
register_once('ttu_pte', function(keys, args)
  local M, vpn = keys[1], tonumber(args[1])
  local raw = redis.call('HGET', M .. ':vma', args[2])
  if not raw then return {3, ''} end
  local v = cjson.decode(raw)
  if not (v.start <= vpn and vpn < v['end']) then return {3, raw} end
  if bit.band(v.flags, tonumber(args[3])) ~= 0 then return {2, raw} end
  local conflicts = pt_install_impl(M, {args[1], args[4], args[5], args[6], args[7], args[8],
                                        args[9]}, 1)
  return {#conflicts > 0 and 1 or 0, raw}
end)

-- pt_install_unlock(M; tok, contended, bounce, wait_us, hold_us, lease_ms, entries...):
-- the last step of a fault: install the ptes, then release mmap_lock, in one round trip.
register_once('pt_install_unlock', function(keys, args)
  -- fenced: a holder whose mmap_lock was evicted (its CPU taken offline) installs nothing
  if not lk_holds(keys[1] .. ':mmap_lock', tonumber(args[1])) then return {-1} end
  local conflicts = pt_install_impl(keys[1], args, 7)
  if #conflicts == 0 then  -- a fault that raced keeps the lock: it retries
    lk_release_impl(keys[1] .. ':mmap_lock', {args[1], args[2], args[3], args[4], args[5],
                                              args[6]})
  end
  return conflicts
end)

-- pt_markers(M) -> flat {vpn, idx, lv, bits} of the entries that are not present but name a
-- page (MIGRATION: a migration entry, or a COW fault's claim): recovery after a CPU death.
register_once('pt_markers', function(keys, args)
  local M = keys[1]
  local out = {}
  for _, pm in ipairs(redis.call('ZRANGE', M .. ':pmds', 0, -1)) do
    local s = redis.call('GET', M .. ':pt:' .. pm)
    if s then
      local base = tonumber(pm) * PTRS_PER_PMD
      for i = 0, PTRS_PER_PMD - 1 do
        local idx, lv, bits = struct.unpack(PTE_FMT, s, i * PTE_SIZE + 1)
        if band(bits, PTE_PRESENT) == 0 and band(bits, PTE_MIGRATION) ~= 0 then
          out[#out + 1] = base + i; out[#out + 1] = idx; out[#out + 1] = lv
          out[#out + 1] = bits
        end
      end
    else
      local h = redis.call('GET', M .. ':hpmd:' .. pm)
      if h then
        local idx, lv, bits = struct.unpack(PTE_FMT, h)
        if band(bits, PTE_PRESENT) == 0 and band(bits, PTE_MIGRATION) ~= 0 then
          -- a pmd migration entry, reported at its first address with PMD set
          out[#out + 1] = tonumber(pm) * PTRS_PER_PMD; out[#out + 1] = idx
          out[#out + 1] = lv; out[#out + 1] = bit.bor(bits, PTE_PMD)
        end
      end
    end
  end
  return out
end)

-- pt_zap(M; v0, v1) -> flat {vpn, idx, lv, bits} of the present ptes and swap entries removed
-- from [v0, v1).
-- Only existing page tables are visited (zap_pmd_range skips empty pmds).
register_once('pt_zap', function(keys, args)
  local M, v0, v1 = keys[1], tonumber(args[1]), tonumber(args[2])
  local out = {}
  local t0, tables = redis.call('TIME'), 0
  local zero = string.rep('\0', PTE_SIZE)
  local empty = string.rep('\0', PTRS_PER_PMD * PTE_SIZE)
  local first = math.floor(v0 / PTRS_PER_PMD)
  local last = math.floor((v1 - 1) / PTRS_PER_PMD)
  for _, pm in ipairs(redis.call('ZRANGEBYSCORE', M .. ':pmds', first, last)) do
    local pmd = tonumber(pm)
    local key = M .. ':pt:' .. pmd
    local s = redis.call('GET', key)
    local h = (not s) and redis.call('GET', M .. ':hpmd:' .. pmd)
    if h then
      local base = pmd * PTRS_PER_PMD
      local idx, lv, bits = struct.unpack(PTE_FMT, h)
      tables = tables + 1
      if band(bits, PTE_PRESENT) == 0 then
        -- a pmd migration entry goes without a report, whatever part of it the range
        -- covers (zap_huge_pmd; the migration's restore then finds it gone and maps
        -- nothing - Linux would split it into pte migration entries for a partial zap)
      elseif v0 > base or v1 < base + PTRS_PER_PMD then
        -- zap_huge_pmd: only whole pmds (the caller splits a pmd a range cuts through)
        error('mmsvc: partial zap of a huge pmd ' .. pmd .. ' (split it first)')
      else
        out[#out + 1] = base; out[#out + 1] = idx; out[#out + 1] = lv
        out[#out + 1] = bit.bor(bits, PTE_PMD)
      end
      redis.call('DEL', M .. ':hpmd:' .. pmd)
      redis.call('ZREM', M .. ':pmds', pmd)
    end
    if s then
      tables = tables + 1
      local base = pmd * PTRS_PER_PMD
      local a = math.max(v0, base) - base
      local b = math.min(v1, base + PTRS_PER_PMD) - base
      for i = a, b - 1 do
        local idx, lv, bits = struct.unpack(PTE_FMT, s, i * PTE_SIZE + 1)
        -- a swap entry goes too, reported for its slot reference (mm/swapfile.py); a
        -- migration entry (or a COW fault's claim) is cleared, not reported: its mapping was
        -- removed when it was set (zap_pte_range's pte_clear_not_present_full), and the
        -- restore that finds the pte changed maps nothing (remove_migration_pte).  MIGRATION
        -- is tested before SWAP: in a subpage's migration entry bit 7 is the subpage number.
        if band(bits, PTE_PRESENT) ~= 0
            or (band(bits, PTE_MIGRATION) == 0 and band(bits, PTE_SWAP) ~= 0) then
          out[#out + 1] = base + i; out[#out + 1] = idx; out[#out + 1] = lv; out[#out + 1] = bits
          redis.call('SETRANGE', key, i * PTE_SIZE, zero)
        elseif band(bits, PTE_MIGRATION) ~= 0 then
          redis.call('SETRANGE', key, i * PTE_SIZE, zero)
        end
      end
      if (a == 0 and b == PTRS_PER_PMD) or redis.call('GET', key) == empty then
        redis.call('DEL', key)  -- free_pgtables(): an empty page table goes
        redis.call('ZREM', M .. ':pmds', pmd)
      end
    end
  end
  ptl_account(M, tables, t0)
  return out
end)

-- mm_dump(T) -> {meta (flat), chunks...}: one lruvec's metadata and every struct page, read
-- atomically, so the checker compares counters with the pages they count (§8.5 A1, A3).
redis.register_function{function_name = 'mm_dump', flags = {'no-writes'},
  callback = function(keys, args)
    local T = keys[1]
    local meta = redis.call('HGETALL', T .. ':meta')
    local top = 0
    for i = 1, #meta, 2 do if meta[i] == 'top' then top = tonumber(meta[i + 1]) end end
    local out = {meta}
    for c = 0, math.floor((top + CHUNK_PAGES - 1) / CHUNK_PAGES) - 1 do
      out[#out + 1] = redis.call('GET', T .. ':pg:' .. c) or ''
    end
    return out
  end}

-- pmd_install(M; pmd, idx, lv, bits, expect_idx, expect_lv, expect_bits): map a THP with the
-- pmd itself (do_huge_pmd_anonymous_page, copy_huge_pmd, a write-protect); expect 0,0,0 =
-- pmd_none (no page table, no huge pmd).  Returns 1 when done, 0 when the pmd differed.
register_once('pmd_install', function(keys, args)
  local M, pmd = keys[1], tonumber(args[1])
  local hkey = M .. ':hpmd:' .. pmd
  local cur = redis.call('GET', hkey)
  local ei, el, eb = tonumber(args[5]), tonumber(args[6]), tonumber(args[7])
  if cur then
    local ci, cl, cb = struct.unpack(PTE_FMT, cur)
    if ci ~= ei or cl ~= el or cb ~= eb then return 0 end
  else
    if ei ~= 0 or el ~= 0 or eb ~= 0 then return 0 end
    if redis.call('EXISTS', M .. ':pt:' .. pmd) == 1 then return 0 end
  end
  redis.call('SET', hkey, struct.pack(PTE_FMT, tonumber(args[2]), tonumber(args[3]),
                                      tonumber(args[4])))
  redis.call('ZADD', M .. ':pmds', pmd, pmd)
  return 1
end)

-- pmd_zap(M; pmd, expect_idx, expect_lv, expect_bits) -> 1 or 0: the huge pmd of a file THP
-- is cleared when it is still that one (__split_huge_pmd_locked of a file pmd, and
-- try_to_unmap(TTU_SPLIT_HUGE_PMD) of a file THP: no ptes take its place, later faults map
-- the subpages again).
register_once('pmd_zap', function(keys, args)
  local M, pmd = keys[1], tonumber(args[1])
  local hkey = M .. ':hpmd:' .. pmd
  local cur = redis.call('GET', hkey)
  if not cur then return 0 end
  local ci, cl, cb = struct.unpack(PTE_FMT, cur)
  if ci ~= tonumber(args[2]) or cl ~= tonumber(args[3]) or cb ~= tonumber(args[4]) then
    return 0
  end
  redis.call('DEL', hkey)
  redis.call('ZREM', M .. ':pmds', pmd)
  return 1
end)

-- pt_retract(M; pmd...) -> the pmds whose page table went: retract_page_tables /
-- collapse_pte_mapped_thp after collapse_file unmapped the small pages: a page table with
-- no entry left (no pte, swap entry or marker) is freed, so that the pmd is pmd_none and a
-- fault can map the new THP with the pmd itself.
register_once('pt_retract', function(keys, args)
  local M = keys[1]
  local empty = string.rep('\0', PTRS_PER_PMD * PTE_SIZE)
  local out = {}
  for i = 1, #args do
    local key = M .. ':pt:' .. args[i]
    if redis.call('GET', key) == empty then
      redis.call('DEL', key)
      redis.call('ZREM', M .. ':pmds', tonumber(args[i]))
      out[#out + 1] = tonumber(args[i])
    end
  end
  return out
end)

-- pmd_split(M; pmd) -> {} or {idx, lv, bits}: __split_huge_pmd: the huge pmd becomes a page
-- table of 512 ptes, each mapping its subpage of the THP (SUBPAGE, number in the high bits).
register_once('pmd_split', function(keys, args)
  local M, pmd = keys[1], tonumber(args[1])
  local hkey = M .. ':hpmd:' .. pmd
  local h = redis.call('GET', hkey)
  if not h then return {} end
  local idx, lv, bits = struct.unpack(PTE_FMT, h)
  if band(bits, PTE_PRESENT) == 0 then
    -- a pmd migration entry (migrate_thp.py): of a file vma (args[2] == 'file') it is just
    -- cleared, as a file pmd is; of an anonymous one it becomes 512 pte migration entries,
    -- one per subpage (__split_huge_pmd_locked's migration branch).  Its mapping was
    -- removed when it was set, so nothing is counted - the restore maps what is left.
    if args[2] == 'file' then
      redis.call('DEL', hkey)
      redis.call('ZREM', M .. ':pmds', pmd)
      return {}
    end
    local parts = {}
    for i = 0, PTRS_PER_PMD - 1 do
      parts[#parts + 1] = struct.pack(PTE_FMT, idx, lv, bit.bor(bits, PTE_SUBPAGE,
                                                             bit.lshift(i, SUBPAGE_SHIFT)))
    end
    redis.call('SET', M .. ':pt:' .. pmd, table.concat(parts))
    redis.call('DEL', hkey)
    return {}
  end
  local parts = {}
  for i = 0, PTRS_PER_PMD - 1 do
    parts[#parts + 1] = struct.pack(PTE_FMT, idx, lv,
      bit.bor(bits, PTE_SUBPAGE, bit.lshift(i, SUBPAGE_SHIFT)))
  end
  redis.call('SET', M .. ':pt:' .. pmd, table.concat(parts))
  redis.call('DEL', hkey)
  return {idx, lv, bits}
end)

-- mm_pages_install(T, M; hdr, ops, tok, contended, bounce, wait_us, hold_us, lease_ms, entries...):
-- the last two steps of a fault in one round trip, where one store holds both slots (not on a
-- Redis Cluster): the page program of one lruvec (mm_pages), then, if it ran to its end, the
-- ptes installed and mmap_lock released (pt_install_unlock).  An entry's idx -k names the k-th
-- page the program allocated.  Returns {program result} when the program stopped early
-- (nothing installed: the caller goes on as after mm_pages), else {program result, conflicts}
-- ({-1}: fenced).
register_once('mm_pages_install', function(keys, args)
  local raw = mm_pages_body({keys[1]}, {args[1], args[2]})
  local res = cjson.decode(raw)
  if res.reason ~= nil then return {raw} end  -- no reason: every op ran
  local allocs = res.alloc
  if type(allocs) ~= 'table' then allocs = {} end
  local M = keys[2]
  if not lk_holds(M .. ':mmap_lock', tonumber(args[3])) then return {raw, {-1}} end
  for i = 9, #args, 7 do
    local idx = tonumber(args[i + 1])
    if idx < 0 then args[i + 1] = allocs[-idx] end
  end
  local conflicts = pt_install_impl(M, args, 9)
  if #conflicts == 0 then
    lk_release_impl(M .. ':mmap_lock', {args[3], args[4], args[5], args[6], args[7], args[8]})
  end
  return {raw, conflicts}
end)

-- fault_fast(M, T; mode, cpu, lease_ms, vma_id, vma_json, hdr, ops, entries... (args[8] on)): a whole
-- fault in one round trip, where one store holds both slots: the worker built the fault from
-- the address space as it last saw it; here, before anything is written, the VMA must still
-- be that one (its stored JSON), the process alive, every pte of the entries still none, and
-- mmap_lock free for `mode` - otherwise {'miss'} and nothing happened (the worker faults the
-- usual way).  Then mmap_lock is taken, the program runs (mm_pages) and, if it ran to its end,
-- the ptes are set and the lock released: {'done', tok, bounce, result}.  A program that
-- stopped early returns {'held', tok, bounce, result}: the worker holds the lock and goes on
-- as after mm_pages.  Entries are pt_install's (idx -k: the k-th page allocated).
register_once('fault_fast', function(keys, args)
  local M, T = keys[1], keys[2]
  if redis.call('HGET', M .. ':info', 'alive') ~= '1' then return {'miss'} end
  if redis.call('HGET', M .. ':vma', args[4]) ~= args[5] then return {'miss'} end
  for i = 8, #args, 7 do
    local idx, lv, bits = pt_load(M, tonumber(args[i]))
    if idx ~= 0 or lv ~= 0 or bits ~= 0 then return {'miss'} end
  end
  local L = M .. ':mmap_lock'
  local now = now_ms()
  local lease_ms = tonumber(args[3])
  lk_purge(L, now, lease_ms)
  if not lk_free_for(L, args[1]) then return {'miss'} end
  local tok, bounce = lk_grant(L, args[1], tonumber(args[2]), lease_ms, now)
  local raw = mm_pages_body({T}, {args[6], args[7]})
  local res = cjson.decode(raw)
  if res.reason ~= nil then return {'held', tok, bounce, raw} end
  local allocs = res.alloc
  if type(allocs) ~= 'table' then allocs = {} end
  for i = 8, #args, 7 do
    local idx = tonumber(args[i + 1])
    if idx < 0 then args[i + 1] = allocs[-idx] end
  end
  pt_install_impl(M, args, 8)  -- no conflict: the ptes were none and the lock is ours
  lk_release_impl(L, {tok, 0, bounce, '0', '0', lease_ms})
  return {'done', tok, bounce, raw}
end)
