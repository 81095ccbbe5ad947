-- ipc/shm.c + mm/shmem.c (shmem_lock, shmem_unlock_mapping) + mm/vmscan.c
-- (check_move_unevictable_folios): SysV shared memory and SHM_LOCK (spec §1.1.4, §1.6.1, §7.1
-- `scanned`, §8.5 X2, S30).  Orchestrated by mmsvc/mm/shm.py.
--
-- K:shm  hash (machine slot)  "<shmid>" -> "fid|pages|locked";  "user_locked" -> pages
--        charged by user_shm_lock (all processes of a machine are one user)
-- F:as   hash (file slot)     "flags" -> the mapping's flags as page flags: PG_UNEVICTABLE_MAPPING
--        while SHM_LOCKed (mapping_set_unevictable); read by pc_lookup_flags (filemap.lua) so
--        a page read in afterwards is born with it

-- shm_ctl(K; shmid, cmd, limit, capable) -> {errno or 'ok', fid, changed}
-- cmd 'lock': shmem_lock(file, 1): a locked segment is left alone (no second charge);
--   otherwise user_shm_lock charges the segment's pages to the user, refused (ENOMEM) beyond
--   RLIMIT_MEMLOCK (`limit` pages, -1 = infinity) unless `capable` (CAP_IPC_LOCK).
-- cmd 'unlock': a segment not locked is left alone (no scan: shmctl returns at once);
--   otherwise the charge goes and changed = 1: the caller runs shmem_unlock_mapping.
register_once('shm_ctl', function(keys, args)
  local K = keys[1] .. ':shm'
  local shmid, cmd, limit, capable = args[1], args[2], tonumber(args[3]), args[4] == '1'
  local seg = redis.call('HGET', K, shmid)
  if not seg then return {'EINVAL', 0, 0} end
  local fid, pages, locked = string.match(seg, '^(%d+)|(%d+)|(%d+)$')
  pages = tonumber(pages)
  local charged = tonumber(redis.call('HGET', K, 'user_locked') or '0')
  if cmd == 'lock' then
    if locked == '1' then return {'ok', tonumber(fid), 0} end
    if limit >= 0 and charged + pages > limit and not capable then
      return {'ENOMEM', tonumber(fid), 0}
    end
    redis.call('HSET', K, 'user_locked', charged + pages)
    redis.call('HSET', K, shmid, fid .. '|' .. pages .. '|1')
    return {'ok', tonumber(fid), 1}
  end
  if locked ~= '1' then return {'ok', tonumber(fid), 0} end
  redis.call('HSET', K, 'user_locked', math.max(charged - pages, 0))
  redis.call('HSET', K, shmid, fid .. '|' .. pages .. '|0')
  return {'ok', tonumber(fid), 1}
end)

-- shm_mapping_flags(F; flags) -> previous: mapping_set_unevictable / mapping_clear_unevictable.
register_once('shm_mapping_flags', function(keys, args)
  local prev = tonumber(redis.call('HGET', keys[1] .. ':as', 'flags') or '0')
  redis.call('HSET', keys[1] .. ':as', 'flags', tonumber(args[1]))
  return prev
end)

-- A page of file `fid` at `index` found in its page cache by a lookup that holds no reference
-- (filemap_get_folios): nil when it was freed or reused meanwhile.
local function shm_cache_page(idx, fid, index)
  local p = pg(idx, true)
  if p == nil or not has(p, PG_PAGECACHE) or has(p, PG_ANON) or p.mapping ~= fid
      or p.index ~= index then
    return nil
  end
  return p
end

-- check_move_unevictable_folios for one page, after its mapping became evictable again:
-- every page looked at is `scanned`; one on the LRU (test-and-clear PG_lru, under the lruvec
-- lock) that is now evictable but on the unevictable LRU moves to its evictable list and is
-- `rescued`.  An mlocked page stays (page_evictable is false); a page off the LRU (isolated,
-- in an lru_add batch) is only scanned: its lru-add re-decides (§2.1.4).
local function check_move_unevictable_page(idx, p)
  local n = nr_pages(p)
  ev('unevictable_pgs_scanned', n)
  if not test_clear(p, PG_LRU) then return end
  if evictable(p) and has(p, PG_UNEVICTABLE) then
    list_move(idx, p, function(q) clr(q, PG_UNEVICTABLE) end)
    ev('unevictable_pgs_rescued', n)
  end
  set(p, PG_LRU)
  dirty(idx)
end
