-- mm/mlock.c after the rework: the tagged per-CPU mlock batch (spec §2.2-§2.6, patch 10/13).
--
-- This lruvec's part of cpu's mlock batch is T:mlb:<cpu>, entries "idx|tag|seq" with tag
-- L = LRU_PAGE (mlock_page), N = NEW_PAGE (mlock_new_page), U = untagged (munlock_page).

-- §2.2.1 mlock_page: PG_mlocked is set (and counted) at enqueue, before queueing.
local function mlock_page(idx, cpu, seq)
  local p = pg(idx)
  if not test_set(p, PG_MLOCKED) then
    meta_add('nr_mlock', nr_pages(p))
    ev('unevictable_pgs_mlocked', nr_pages(p))
  end
  get_page(idx, 1)
  batch_push('mlb', cpu, idx, 'L', seq)
  return p
end

-- §2.2.2 mlock_new_page: a new page, not yet on any LRU; it bypasses the lru_add batch.
local function mlock_new_page(idx, cpu, seq)
  local p = pg(idx)
  if has(p, PG_LRU) then error('mmsvc: mlock_new_page of a page on the LRU') end
  if test_set(p, PG_MLOCKED) then error('mmsvc: mlock_new_page of an mlocked page') end
  meta_add('nr_mlock', nr_pages(p))
  ev('unevictable_pgs_mlocked', nr_pages(p))
  get_page(idx, 1)
  batch_push('mlb', cpu, idx, 'N', seq)
  return p
end

-- §2.2.3 munlock_page: changes nothing but the reference; the batch decides (Appendix C.1).
local function munlock_page(idx, cpu, seq)
  local p = get_page(idx, 1)
  batch_push('mlb', cpu, idx, 'U', seq)
  return p
end

-- §2.4 __mlock_page (LRU_PAGE entry; `residue`: an entry mark_residue tagged).
local function mlock_page_batched(idx, residue)
  local p = pg(idx)
  -- §2.4.1: "there is nothing more we can do while it's off LRU".
  if not test_clear(p, PG_LRU) then dirty(idx); STATS.offlru = STATS.offlru + 1; return end
  local n = nr_pages(p)
  if evictable(p) then
    -- §2.4.3 / §8.3 row 7: munlocked meanwhile on another CPU: rescue if unevictable.
    if has(p, PG_UNEVICTABLE) then
      list_move(idx, p, function(q) clr(q, PG_UNEVICTABLE) end)
      ev('unevictable_pgs_rescued', n)
    end
  elseif has(p, PG_UNEVICTABLE) then
    -- §2.4.4: already on the unevictable LRU: one more counted mapping.
    if has(p, PG_MLOCKED) then
      p.prev = p.prev + 1
      if residue then set(p, PG_RESIDUE) end
    end
  else
    -- §2.4.5: cull; mlock_count := !!PG_mlocked (§8.2 final), or 1 (v1 06/13).
    list_del(idx, p, page_lru(p))
    clr(p, PG_ACTIVE)
    set(p, PG_UNEVICTABLE)
    list_add(idx, p, LRU_UNEVICTABLE)
    if CFG.init_cull_one == 1 or has(p, PG_MLOCKED) then p.prev = 1 else p.prev = 0 end
    if residue and p.prev > 0 then set(p, PG_RESIDUE) end
    ev('unevictable_pgs_culled', n)
  end
  set(p, PG_LRU)
  dirty(idx)
end

-- §8.3 rows 11-12 ("a new way of stranding"): a munlock that clears PG_mlocked cannot see the
-- LRU_PAGE entries of this page still queued on other CPUs (it drains its own CPU only, §3.6).
-- Linux processes them later as if new: after a re-mlock has culled the page, each one counts
-- a mapping already counted.  The emulator does the same and only tags those entries (L -> R),
-- so that a count they raise marks the page PG_RESIDUE for the checker (X4).
local RESIDUE_CPUS = nil
local function mark_residue(idx, cpu)
  if RESIDUE_CPUS == nil then RESIDUE_CPUS = redis.call('SMEMBERS', T .. ':mlbcpus') end
  for _, c in ipairs(RESIDUE_CPUS) do
    if tonumber(c) ~= cpu then
      local b, k = batch('mlb', c)
      for _, e in ipairs(b) do
        if e[1] == idx and e[2] == 'L' then
          e[2] = 'R'
          BDIRTY[k] = true
          BMOD[k] = true  -- changed in place: commit() rewrites the list
        end
      end
    end
  end
end

-- §2.5 __mlock_new_page (NEW_PAGE entry).
local function mlock_new_page_batched(idx)
  local p = pg(idx)
  if has(p, PG_LRU) then error('mmsvc: NEW_PAGE entry for a page on the LRU') end
  if evictable(p) then
    list_add(idx, p, page_lru(p))
  else
    set(p, PG_UNEVICTABLE)
    list_add(idx, p, LRU_UNEVICTABLE)
    if has(p, PG_MLOCKED) then p.prev = 1 else p.prev = 0 end
    ev('unevictable_pgs_culled', nr_pages(p))
  end
  set(p, PG_LRU)
  dirty(idx)
end

-- §2.6 __munlock_page (untagged entry).
local function munlock_page_batched(idx, cpu)
  local p = pg(idx)
  local n = nr_pages(p)
  local isolated = test_clear(p, PG_LRU)
  dirty(idx)
  if isolated and has(p, PG_UNEVICTABLE) then
    -- §2.6.3: "might undercount": never below 0 (§1.3.4).
    if p.prev > 0 then p.prev = p.prev - 1 end
    if p.prev > 0 then set(p, PG_LRU); return end
  end
  -- else: "assume that was the last mlock: reclaim will fix it if not".
  if test_clear(p, PG_MLOCKED) then
    meta_add('nr_mlock', -n)
    clr(p, PG_RESIDUE)
    clr(p, PG_RESTORED_MLOCKED)
    mark_residue(idx, cpu)
    if isolated or not has(p, PG_UNEVICTABLE) then
      ev('unevictable_pgs_munlocked', n)
    else
      ev('unevictable_pgs_stranded', n)
    end
  end
  -- §2.6.5: evaluated after the flag was cleared.
  if isolated and has(p, PG_UNEVICTABLE) and evictable(p) then
    list_move(idx, p, function(q) clr(q, PG_UNEVICTABLE) end)
    ev('unevictable_pgs_rescued', n)
  end
  if isolated then set(p, PG_LRU) end
end

-- §2.3 mlock_pagevec for this lruvec's run of `count` entries of cpu's batch.
local function mlock_flush(cpu, count)
  RESIDUE_CPUS = nil
  local entries = batch_take('mlb', cpu, count)
  for _, e in ipairs(entries) do
    local idx, tag = e[1], e[2]
    if tag == 'L' or tag == 'R' then mlock_page_batched(idx, tag == 'R')
    elseif tag == 'N' then mlock_new_page_batched(idx)
    else munlock_page_batched(idx, cpu) end
  end
  return entries
end
