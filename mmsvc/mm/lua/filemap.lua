-- mm/filemap.c + the i_mmap tree: a file's page cache and its rmap (file slot F).
--
-- F:pc    hash  index -> "lv|idx" (a page in the cache) or "busy|<owner>" (being read in,
--               the emulated locked page: other faulters retry), "swap|<slot>" (a shmem
--               page swapped out: the xarray's swap value entry, shmem_writeout) or
--               "busy|<owner>|<slot>" (being read back from that slot)
-- F:immap hash  "<pid>|<vma>" -> "pgoff|npages"  (the i_mmap interval tree, spec §1.8)
-- F:isize string  the file's size in pages once truncated (mm/truncate.py; else the registry's)
-- F:as    hash  "flags" -> the mapping's flags (AS_UNEVICTABLE as PG_UNEVICTABLE_MAPPING: shm.lua)

-- pc_lookup(F; owner, index...) -> per index: "lv|idx", "busy", or "new" (now reserved by owner)
-- or "swapin|<slot>" (a swapped-out shmem page, now reserved by owner to be read back: a
-- dropped reservation puts the swap entry back) or "eof": at or beyond i_size (F:isize, set
-- once the file was truncated: mm/truncate.py), read in the same step, so a fault racing a
-- truncation never reads a page in beyond the new end (filemap_fault's i_size check: SIGBUS)
local function pc_lookup(keys, args)
  local F, owner = keys[1], args[1]
  local out = {}
  local isize = tonumber(redis.call('GET', F .. ':isize') or '-1')
  for i = 2, #args do
    local v = redis.call('HGET', F .. ':pc', args[i])
    if isize >= 0 and tonumber(args[i]) >= isize then
      out[#out + 1] = 'eof'
    elseif not v then
      redis.call('HSET', F .. ':pc', args[i], 'busy|' .. owner)
      out[#out + 1] = 'new'
    elseif string.sub(v, 1, 5) == 'swap|' then
      redis.call('HSET', F .. ':pc', args[i], 'busy|' .. owner .. '|' .. string.sub(v, 6))
      out[#out + 1] = 'swapin|' .. string.sub(v, 6)
    elseif string.sub(v, 1, 5) == 'busy|' then
      local who, slot = string.match(v, '^busy|([^|]+)|?(%d*)$')
      if who ~= owner then out[#out + 1] = 'busy'
      elseif slot ~= '' then out[#out + 1] = 'swapin|' .. slot
      else out[#out + 1] = 'new' end
    else
      out[#out + 1] = v
    end
  end
  return out
end
register_once('pc_lookup', pc_lookup)

-- pc_lookup_flags(F; owner, index...): pc_lookup, then the mapping's flags (F:as, set while
-- SHM_LOCKed: lua/shm.lua) read in the same step, so a page read in for a reserved slot is
-- born with what the mapping was when the slot was reserved (SHM_UNLOCK waits for the
-- reservations it sees to be published, then clears the mark on their pages too).
register_once('pc_lookup_flags', function(keys, args)
  local out = pc_lookup(keys, args)
  out[#out + 1] = tonumber(redis.call('HGET', keys[1] .. ':as', 'flags') or '0')
  return out
end)

-- pc_peek(F; index...) -> per index "lv|idx" or false: lookups that reserve nothing.
redis.register_function{function_name = 'pc_peek', flags = {'no-writes'},
  callback = function(keys, args)
    local out = {}
    for i = 1, #args do
      local v = redis.call('HGET', keys[1] .. ':pc', args[i])
      if v and (string.sub(v, 1, 5) == 'busy|' or string.sub(v, 1, 5) == 'swap|') then
        v = false  -- fault-around maps only pages (filemap_map_pages skips value entries)
      end
      out[i] = v or false
    end
    return out
  end}

-- pc_commit(F; owner, index, "lv|idx" | "", ...): publish pages read in (or drop reservations:
-- a slot reserved to be read back from swap holds its swap entry again).
register_once('pc_commit', function(keys, args)
  local F, owner = keys[1], args[1]
  for i = 2, #args, 2 do
    local cur = redis.call('HGET', F .. ':pc', args[i])
    local mine = cur == 'busy|' .. owner
    local slot = cur and string.match(cur, '^busy|' .. owner .. '|(%d+)$')
    if mine or slot then
      if args[i + 1] ~= '' then redis.call('HSET', F .. ':pc', args[i], args[i + 1])
      elseif slot then redis.call('HSET', F .. ':pc', args[i], 'swap|' .. slot)
      else redis.call('HDEL', F .. ':pc', args[i]) end
    end
  end
  return 1
end)

-- pc_swapout(F; index, "lv|idx", slot) -> 1, or 0 when the slot no longer holds that page:
-- shmem_writeout's shmem_delete_from_page_cache, the page's slot now names its swap entry.
register_once('pc_swapout', function(keys, args)
  if redis.call('HGET', keys[1] .. ':pc', args[1]) ~= args[2] then return 0 end
  redis.call('HSET', keys[1] .. ':pc', args[1], 'swap|' .. args[3])
  return 1
end)

-- pc_swap_drop(F; index, slot) -> 1, or 0 when the slot holds something else: truncation of
-- a swapped-out shmem page (shmem_free_swap: the caller frees the swap entry).
register_once('pc_swap_drop', function(keys, args)
  if redis.call('HGET', keys[1] .. ':pc', args[1]) ~= 'swap|' .. args[2] then return 0 end
  return redis.call('HDEL', keys[1] .. ':pc', args[1])
end)

-- pc_delete(F; index, "lv|idx"): the page leaves the page cache (__filemap_remove_folio),
-- unless the slot already holds another page.
register_once('pc_delete', function(keys, args)
  if redis.call('HGET', keys[1] .. ':pc', args[1]) == args[2] then
    return redis.call('HDEL', keys[1] .. ':pc', args[1])
  end
  return 0
end)

-- A file THP (khugepaged.py) fills every slot of its range with "lv|head|base" (base: the
-- head's index, so a lookup knows the subpage without reading the record): the multi-index
-- entry of the xarray.

-- pc_collapse(F; owner, "lv|head|base", index, expected, ...): collapse_file's xas_store of
-- the new THP at each index of its range, all at once: each slot must still hold what the
-- collapse locked and froze ("lv|idx") or reserved (expected "": "busy|owner", a hole);
-- else 0 and nothing changed.
register_once('pc_collapse', function(keys, args)
  local F, owner, val = keys[1], args[1], args[2]
  for i = 3, #args, 2 do
    local want = args[i + 1]
    if want == '' then want = 'busy|' .. owner end
    if redis.call('HGET', F .. ':pc', args[i]) ~= want then return 0 end
  end
  for i = 3, #args, 2 do redis.call('HSET', F .. ':pc', args[i], val) end
  return 1
end)

-- pc_split(F; "lv|head|base", tail1, ..., tailN): __split_huge_page of a file THP: slot
-- base holds the head as a small page again, slot base + i its tail i.  Slots that no
-- longer hold the THP are left alone.  Returns the slots rewritten.
register_once('pc_split', function(keys, args)
  local F, thp = keys[1], args[1]
  local lv, head, base = string.match(thp, '^(%d+)|(%d+)|(%d+)$')
  base = tonumber(base)
  local n = 0
  for i = 0, #args - 1 do
    local slot = base + i
    if redis.call('HGET', F .. ':pc', slot) == thp then
      local idx = (i == 0) and head or args[i + 1]
      redis.call('HSET', F .. ':pc', slot, lv .. '|' .. idx)
      n = n + 1
    end
  end
  return n
end)

-- pc_move(F; old value, new value, index...): migration of a file THP (migrate.py): each slot
-- that still holds the old THP names the new one.  Returns the slots rewritten.
register_once('pc_move', function(keys, args)
  local n = 0
  for i = 3, #args do
    if redis.call('HGET', keys[1] .. ':pc', args[i]) == args[1] then
      redis.call('HSET', keys[1] .. ':pc', args[i], args[2])
      n = n + 1
    end
  end
  return n
end)

-- pc_delete_all(F; value, index...): a whole THP leaves the page cache (truncation): each
-- slot that still holds it is emptied.  Returns the slots emptied.
register_once('pc_delete_all', function(keys, args)
  local n = 0
  for i = 2, #args do
    if redis.call('HGET', keys[1] .. ':pc', args[i]) == args[1] then
      n = n + redis.call('HDEL', keys[1] .. ':pc', args[i])
    end
  end
  return n
end)
