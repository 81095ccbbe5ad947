-- mm/swapfile.c + mm/swap_state.c, store side: the machine's swap area and swap cache
-- (mm/swapfile.py).  K = {m<id>}:swap, a hash {top, pswpin, pswpout}; K:map slot -> swap count
-- (the swap ptes naming the slot: swap_map[]); K:cache slot -> "lv|idx" (the swap cache,
-- SWAP_HAS_CACHE); K:rev "lv|idx" -> slot (folio->swap); K:free: freed slots for reuse.
-- Slots are numbered from 1.  A slot is allocated while its count is > 0 or it is cached.
-- Every function validates before it writes: an error leaves the area unchanged.

local SWP = {}

function SWP.release(K, slot)
  redis.call('HDEL', K .. ':map', slot)
  redis.call('RPUSH', K .. ':free', slot)
end

-- swap_alloc(K; total, ref[, dups]) -> slot, or 0 when the area is full: get_swap_page +
-- add_to_swap_cache of page ref (add_to_swap, §5).  dups: the swap_duplicate of each of the
-- page's mappings that reclaim's try_to_unmap is about to replace (one round trip less per
-- page; a pte that raced undoes its share with swap_dup).
register_once('swap_alloc', function(keys, args)
  local K, total, ref, dups = keys[1], tonumber(args[1]), args[2], tonumber(args[3] or '0')
  if redis.call('HEXISTS', K .. ':rev', ref) == 1 then
    return redis.error_reply('EEXIST page ' .. ref .. ' is in the swap cache already')
  end
  local slot = redis.call('LPOP', K .. ':free')
  if not slot then
    local top = tonumber(redis.call('HGET', K, 'top') or '0')
    if top >= total then return 0 end
    slot = tostring(top + 1)
    redis.call('HSET', K, 'top', slot)
  end
  redis.call('HSET', K .. ':map', slot, dups)
  redis.call('HSET', K .. ':cache', slot, ref)
  redis.call('HSET', K .. ':rev', ref, slot)
  return tonumber(slot)
end)

-- swap_dup(K; slot, n) -> count: swap_duplicate (n = 1: a swap pte was set, try_to_unmap_one
-- or fork's copy_nonpresent_pte; n = -1: a set that raced is undone).
register_once('swap_dup', function(keys, args)
  local K, slot, n = keys[1], args[1], tonumber(args[2])
  local c = tonumber(redis.call('HGET', K .. ':map', slot) or '-1')
  if c < 0 or c + n < 0 then
    return redis.error_reply('EINVAL swap slot ' .. slot .. ' not allocated or underflow')
  end
  return redis.call('HINCRBY', K .. ':map', slot, n)
end)

-- swap_free(K; slot...) -> {slot, ref, ...}: swap_free / free_swap_and_cache for swap ptes
-- that went (zap, swap-in).  A slot whose count reaches 0 is freed, unless a page is still in
-- the swap cache for it: those are returned, the caller deletes the page from the swap cache
-- (try_to_free_swap), which frees the slot.
local function swap_free_impl(K, args)
  local need = {}
  for _, slot in ipairs(args) do need[slot] = (need[slot] or 0) + 1 end
  for slot, n in pairs(need) do
    local c = tonumber(redis.call('HGET', K .. ':map', slot) or '-1')
    if c < n then
      return redis.error_reply('EINVAL swap slot ' .. slot .. ' has fewer swap ptes than freed')
    end
  end
  local out = {}
  for _, slot in ipairs(args) do
    if redis.call('HINCRBY', K .. ':map', slot, -1) == 0 then
      local ref = redis.call('HGET', K .. ':cache', slot)
      if ref then
        out[#out + 1] = tonumber(slot); out[#out + 1] = ref
      else
        SWP.release(K, slot)
      end
    end
  end
  return out
end
register_once('swap_free', function(keys, args) return swap_free_impl(keys[1], args) end)

-- swap_read(K; slot...): a shmem page read back from each slot (shmem_swapin_folio: pswpin),
-- then the page cache's swap entry freed (swap_free: the slot goes when nothing else names
-- it).  Returns what swap_free returns.
register_once('swap_read', function(keys, args)
  local out = swap_free_impl(keys[1], args)  -- validates every slot before it writes
  if out.err then return out end
  redis.call('HINCRBY', keys[1], 'pswpin', #args)
  return out
end)

-- swap_cache_add(K; slot, ref) -> the swap cache's page for slot: ref when added now (the
-- swap-in read, counted pswpin), the page already there (a racing swap-in: EEXIST in
-- __read_swap_cache_async), or '' when the slot is free (the swap pte went meanwhile).
register_once('swap_cache_add', function(keys, args)
  local K, slot, ref = keys[1], args[1], args[2]
  if redis.call('HEXISTS', K .. ':map', slot) == 0 then return '' end
  local cur = redis.call('HGET', K .. ':cache', slot)
  if cur then return cur end
  redis.call('HSET', K .. ':cache', slot, ref)
  redis.call('HSET', K .. ':rev', ref, slot)
  redis.call('HINCRBY', K, 'pswpin', 1)
  return ref
end)

-- swap_cache_del(K; slot, ref, written) -> 1, or 0 when ref is not slot's cached page:
-- __delete_from_swap_cache + put_swap_folio (the slot goes free when no swap pte names it);
-- written = 1 when reclaim wrote the page out first (pageout: pswpout).
register_once('swap_cache_del', function(keys, args)
  local K, slot, ref = keys[1], args[1], args[2]
  if redis.call('HGET', K .. ':cache', slot) ~= ref then return 0 end
  redis.call('HDEL', K .. ':cache', slot)
  redis.call('HDEL', K .. ':rev', ref)
  if tonumber(args[3]) == 1 then redis.call('HINCRBY', K, 'pswpout', 1) end
  if tonumber(redis.call('HGET', K .. ':map', slot) or '0') == 0 then SWP.release(K, slot) end
  return 1
end)

-- pt_swap_read(M; v0, v1) -> flat {vpn, slot, ...}: the swap ptes of [v0, v1) (pt_read
-- reports present ptes only, so no other caller ever sees one).
redis.register_function{function_name = 'pt_swap_read', flags = {'no-writes'},
  callback = function(keys, args)
  local M, v0, v1 = keys[1], tonumber(args[1]), tonumber(args[2])
  local out = {}
  local first = math.floor(v0 / PTRS_PER_PMD)
  local last = math.floor((v1 - 1) / PTRS_PER_PMD)
  for _, pm in ipairs(redis.call('ZRANGEBYSCORE', M .. ':pmds', first, last)) do
    local s = redis.call('GET', M .. ':pt:' .. pm)
    if s then
      local base = tonumber(pm) * PTRS_PER_PMD
      for i = math.max(v0, base) - base, math.min(v1, base + PTRS_PER_PMD) - base - 1 do
        local idx, _, bits = struct.unpack(PTE_FMT, s, i * PTE_SIZE + 1)
        if bit.band(bits, PTE_PRESENT) == 0 and bit.band(bits, PTE_SWAP) ~= 0
            and bit.band(bits, PTE_MIGRATION) == 0 then
          out[#out + 1] = base + i; out[#out + 1] = idx
        end
      end
    end
  end
  return out
end}
