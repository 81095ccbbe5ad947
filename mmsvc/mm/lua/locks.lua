-- Distributed, queued, fenced, instrumented locks (DESIGN.md decision 3; spec §1.8).
--
-- A lock L is a family of keys in the slot of the data it protects:
--   L          hash  mode ('' free, 'r' readers, 'w' writer), tok (fencing counter), last (cpu)
--   L:h        zset  holder token -> lease expiry (ms); an expired holder is evicted
--   L:q        list  FIFO of waiters "wid|mode|cpu" (readers behind a queued writer wait: fair)
--   L:w:<wid>  list  where a waiter is handed its token
--   L:st       hash  lock_stat columns
-- Mutex = writer-only use of the same structure.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The page-table locks (PTL) of an address space: a function holds each page table's lock
-- while it works on it; being atomic it never contends, so only acquisitions and the time
-- spent are recorded, once per call (class "ptl", one row per process).
local function ptl_account(M, tables, t0)
  if tables == 0 then return end
  local t1 = redis.call('TIME')
  local us = (tonumber(t1[1]) - tonumber(t0[1])) * 1e6 + tonumber(t1[2]) - tonumber(t0[2])
  redis.call('HINCRBY', M .. ':ptl:st', 'acquisitions', tables)
  redis.call('HINCRBYFLOAT', M .. ':ptl:st', 'hold_total', us)
  if us > tonumber(redis.call('HGET', M .. ':ptl:st', 'hold_max') or '0') then
    redis.call('HSET', M .. ':ptl:st', 'hold_max', us)
  end
end

-- Present ptes of [v0, v1) of address space M as a flat {vpn, idx, lv, bits, ...}
-- (page tables: M:pt:<pmd>, 512 entries of PTE_FMT, listed in the zset M:pmds).  Only page
-- tables that exist are visited, so a huge unpopulated range costs nothing (§3.6.3, S26).
-- With `max`, stops after the page table where `max` ptes were reached and also returns the
-- vpn to resume from.
local function pt_read_range(M, v0, v1, account, max)
  local out = {}
  local first = math.floor(v0 / PTRS_PER_PMD)
  local last = math.floor((v1 - 1) / PTRS_PER_PMD)
  local t0, tables = redis.call('TIME'), 0
  local resume = v1
  for _, p in ipairs(redis.call('ZRANGEBYSCORE', M .. ':pmds', first, last)) do
    local pmd = tonumber(p)
    if max and #out >= max * 4 then resume = pmd * PTRS_PER_PMD; break end
    local s = redis.call('GET', M .. ':pt:' .. pmd)
    if not s then
      -- a huge pmd (M:hpmd:<pmd>): one THP mapped by the pmd itself, no page table
      local h = redis.call('GET', M .. ':hpmd:' .. pmd)
      local idx, lv, bits = 0, 0, 0
      if h then idx, lv, bits = struct.unpack(PTE_FMT, h) end
      -- a pmd migration entry (not present: migrate.py's THP migration) maps nothing
      if h and bit.band(bits, PTE_PRESENT) ~= 0 then
        tables = tables + 1
        local base = pmd * PTRS_PER_PMD
        for v = math.max(v0, base), math.min(v1, base + PTRS_PER_PMD) - 1 do
          out[#out + 1] = v; out[#out + 1] = idx; out[#out + 1] = lv
          out[#out + 1] = bit.bor(bits, PTE_PMD)
        end
      end
    end
    if s then
      tables = tables + 1
      local base = pmd * PTRS_PER_PMD
      local a = math.max(v0, base) - base
      local b = math.min(v1, base + PTRS_PER_PMD) - base
      for i = a, b - 1 do
        local idx, lv, bits = struct.unpack(PTE_FMT, s, i * PTE_SIZE + 1)
        if bit.band(bits, PTE_PRESENT) ~= 0 then
          out[#out + 1] = base + i; out[#out + 1] = idx
          out[#out + 1] = lv; out[#out + 1] = bits
        end
      end
    end
  end
  if account then ptl_account(M, tables, t0) end
  return out, resume
end

local function lk_mode(L)
  local m = redis.call('HGET', L, 'mode')
  if not m or redis.call('ZCARD', L .. ':h') == 0 then return '' end
  return m
end

local function lk_grant(L, mode, cpu, lease_ms, now)
  local tok = redis.call('HINCRBY', L, 'tok', 1)
  redis.call('ZADD', L .. ':h', now + lease_ms, tok)
  redis.call('HSET', L .. ':hc', tok, cpu)  -- the holder's CPU (lk_evict when it dies)
  local last = redis.call('HGET', L, 'last')
  redis.call('HSET', L, 'mode', mode, 'last', cpu)
  local bounce = 0
  if last and last ~= tostring(cpu) then bounce = 1 end
  return tok, bounce
end

-- Grantable now, without jumping a queue (fairness: readers queue behind a waiting writer).
local function lk_free_for(L, mode)
  if redis.call('LLEN', L .. ':q') > 0 then return false end
  local m = lk_mode(L)
  return m == '' or (m == 'r' and mode == 'r')
end

-- Record one acquisition's statistics (times in microseconds).
local function lk_stat(L, contended, bounce, wait_us, hold_us)
  local st = L .. ':st'
  redis.call('HINCRBY', st, 'acquisitions', 1)
  redis.call('HINCRBY', st, 'acq_bounces', bounce)
  if contended == 1 then
    redis.call('HINCRBY', st, 'contentions', 1)
    redis.call('HINCRBY', st, 'con_bounces', bounce)
    redis.call('HINCRBYFLOAT', st, 'wait_total', wait_us)
    local mn = tonumber(redis.call('HGET', st, 'wait_min') or '-1')
    if mn < 0 or wait_us < mn then redis.call('HSET', st, 'wait_min', wait_us) end
    if wait_us > tonumber(redis.call('HGET', st, 'wait_max') or '0') then
      redis.call('HSET', st, 'wait_max', wait_us)
    end
  end
  redis.call('HINCRBYFLOAT', st, 'hold_total', hold_us)
  local hmn = tonumber(redis.call('HGET', st, 'hold_min') or '-1')
  if hmn < 0 or hold_us < hmn then redis.call('HSET', st, 'hold_min', hold_us) end
  if hold_us > tonumber(redis.call('HGET', st, 'hold_max') or '0') then
    redis.call('HSET', st, 'hold_max', hold_us)
  end
end

-- Is `tok` a current holder of L?  Data functions call this: the fencing check.
local function lk_holds(L, tok)
  return redis.call('ZSCORE', L .. ':h', tok) ~= false
end

local function lk_wake(L, now, lease_ms)
  while true do
    local head = redis.call('LINDEX', L .. ':q', 0)
    if not head then return end
    local wid, mode, cpu = string.match(head, '^([^|]+)|([rw])|(%d+)$')
    local m = lk_mode(L)
    if not (m == '' or (m == 'r' and mode == 'r')) then return end
    redis.call('LPOP', L .. ':q')
    local tok, bounce = lk_grant(L, mode, tonumber(cpu), lease_ms, now)
    redis.call('RPUSH', L .. ':w:' .. wid, tok .. '|' .. bounce)
    redis.call('PEXPIRE', L .. ':w:' .. wid, lease_ms * 4)
    if mode == 'w' then return end
  end
end

-- Evict the holders of L whose lease ran out (a dead or vanished holder: a worker that died, a
-- call whose release never reached the store) and hand the lock to the waiters queued behind
-- them: without the wake, a queue behind an expired holder would wait for a release that
-- never comes, and every later acquirer would queue behind it (the fuzzer's process stall).
local DEFAULT_LEASE_MS = 30000
local function lk_purge(L, now, lease_ms)
  local expired = redis.call('ZRANGEBYSCORE', L .. ':h', '-inf', now)
  if #expired > 0 then
    redis.call('ZREM', L .. ':h', unpack(expired))
    redis.call('HDEL', L .. ':hc', unpack(expired))
    redis.call('HINCRBY', L .. ':st', 'expired', #expired)
    if redis.call('ZCARD', L .. ':h') == 0 then redis.call('HSET', L, 'mode', '') end
    lk_wake(L, now, lease_ms or DEFAULT_LEASE_MS)
  end
end

-- lk_acquire(L; mode, cpu, wid, lease_ms[, try | peek, kind, key]) -> {1, tok, bounce}
-- granted | {0} queued as wid | {-1} busy (try: trylock, nothing queued).
-- peek: granted at once, the reply goes on with what the lock protects, read in the same
-- step (kind 'smembers' or 'hkeys' of key, in L's slot: an rmap walk's candidates).
register_once('lk_acquire', function(keys, args)
  local L, mode, cpu, wid, lease_ms = keys[1], args[1], tonumber(args[2]), args[3], tonumber(args[4])
  local now = now_ms()
  lk_purge(L, now, lease_ms)
  if lk_free_for(L, mode) then
    local tok, bounce = lk_grant(L, mode, cpu, lease_ms, now)
    if args[5] == 'peek' then
      local out = redis.call(args[6] == 'hkeys' and 'HKEYS' or 'SMEMBERS', args[7])
      table.insert(out, 1, bounce); table.insert(out, 1, tok); table.insert(out, 1, 1)
      return out
    end
    return {1, tok, bounce}
  end
  if args[5] == 'try' then
    redis.call('HINCRBY', (args[6] or L) .. ':st', 'trylock_failed', 1)
    return {-1}
  end
  redis.call('RPUSH', L .. ':q', wid .. '|' .. mode .. '|' .. cpu)
  return {0}
end)

-- lk_gone(L): the machine of lock L is being deleted: every queued waiter is woken with
-- "gone" instead of a token (it fails its syscall with ESRCH rather than waiting for a
-- token that would never come), and the queue is emptied.
register_once('lk_gone', function(keys, args)
  local L = keys[1]
  local q = redis.call('LRANGE', L .. ':q', 0, -1)
  for _, e in ipairs(q) do
    local w = L .. ':w:' .. string.match(e, '^([^|]+)')
    redis.call('RPUSH', w, 'gone')
    redis.call('PEXPIRE', w, 60000)
  end
  redis.call('DEL', L .. ':q')
  return #q
end)

-- lk_cancel(L; wid): a waiter gives up (timeout); a token already handed over is released.
register_once('lk_cancel', function(keys, args)
  local L, wid, lease_ms = keys[1], args[1], tonumber(args[2])
  local q = redis.call('LRANGE', L .. ':q', 0, -1)
  for _, e in ipairs(q) do
    if string.sub(e, 1, #wid + 1) == wid .. '|' then redis.call('LREM', L .. ':q', 1, e) end
  end
  local handed = redis.call('LPOP', L .. ':w:' .. wid)
  if handed then
    local tok = string.match(handed, '^(%d+)')
    redis.call('ZREM', L .. ':h', tok)
    lk_wake(L, now_ms(), lease_ms)
  end
  return 1
end)

-- Release token a[1] of L; a = {tok, contended, bounce, wait_us, hold_us, lease_ms[, stats]}.
local function lk_release_impl(L, a)
  local removed = redis.call('ZREM', L .. ':h', a[1])
  redis.call('HDEL', L .. ':hc', a[1])
  local now = now_ms()
  lk_purge(L, now, tonumber(a[6]))
  if removed == 1 then
    -- a[7]: statistics of a lock class kept per family (page locks: per lruvec)
    lk_stat(a[7] or L, tonumber(a[2]), tonumber(a[3]), tonumber(a[4]), tonumber(a[5]))
  end
  if redis.call('ZCARD', L .. ':h') == 0 then redis.call('HSET', L, 'mode', '') end
  lk_wake(L, now, tonumber(a[6]))
  return removed
end

-- lk_evict(L; cpu, lease_ms) -> n: a dead CPU's holds and queued waits on L go (CPU
-- hot-unplug); the next waiters are woken.  A late release or fenced write of an evicted
-- holder finds its token gone.
register_once('lk_evict', function(keys, args)
  local L, cpu = keys[1], tostring(args[1])
  local n = 0
  local hc = redis.call('HGETALL', L .. ':hc')
  for i = 1, #hc, 2 do
    if hc[i + 1] == cpu then
      redis.call('ZREM', L .. ':h', hc[i])
      redis.call('HDEL', L .. ':hc', hc[i])
      n = n + 1
    end
  end
  for _, e in ipairs(redis.call('LRANGE', L .. ':q', 0, -1)) do
    if string.match(e, '|(%d+)$') == cpu then
      redis.call('LREM', L .. ':q', 1, e)
      n = n + 1
    end
  end
  if n > 0 then
    redis.call('HINCRBY', L .. ':st', 'evicted', n)
    if redis.call('ZCARD', L .. ':h') == 0 then redis.call('HSET', L, 'mode', '') end
    lk_wake(L, now_ms(), tonumber(args[2]))
  end
  return n
end)

-- mm_save(M; lock, tok, edits_json): write back an address space's VMA and info edits
-- (removed ids, changed id -> vma json, info field -> value) if `tok` still holds `lock`
-- (fencing; lock '' = unfenced).  Returns 1, or 0 when fenced (nothing written).
register_once('mm_save', function(keys, args)
  local M, lock, tok = keys[1], args[1], tonumber(args[2])
  if lock ~= '' and tok > 0 and not lk_holds(lock, tok) then return 0 end
  local e = cjson.decode(args[3])
  if #e.removed > 0 then redis.call('HDEL', M .. ':vma', unpack(e.removed)) end
  local flat = {}
  for id, v in pairs(e.changed) do flat[#flat + 1] = id; flat[#flat + 1] = v end
  if #flat > 0 then redis.call('HSET', M .. ':vma', unpack(flat)) end
  flat = {}
  for k, v in pairs(e.info) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  if #flat > 0 then redis.call('HSET', M .. ':info', unpack(flat)) end
  return 1
end)

-- cpu_beat(K; cpu, lease_ms) -> CPUs whose lease ran out: renew this CPU's lease in the
-- membership set K ({mmsvc}:cpus: CPU -> expiry in Redis time).
-- Returns {added, stop, dead...}: added = 1 when this CPU was not registered (first beat, or
-- it was taken offline as dead while paused: then it must not go on).
register_once('cpu_beat', function(keys, args)
  local now = now_ms()
  local added = redis.call('ZADD', keys[1], now + tonumber(args[2]), args[1])
  -- a stop_machine in progress ({mmsvc}:stop, same slot): its token, for the CPU to ack
  local out = {added, redis.call('GET', '{mmsvc}:stop') or ''}
  for _, c in ipairs(redis.call('ZRANGEBYSCORE', keys[1], '-inf', now)) do out[#out + 1] = c end
  return out
end)

-- cpu_live(K) -> the CPUs whose lease has not run out (Redis time of K's own node).
redis.register_function{function_name = 'cpu_live', flags = {'no-writes'},
  callback = function(keys, args)
    return redis.call('ZRANGEBYSCORE', keys[1], now_ms(), '+inf')
  end}

-- lk_renew(L; tok, lease_ms) -> 1, or 0 when tok no longer holds L (released, evicted, or
-- purged after its lease ran out): a long holder extends its lease, so that only a holder
-- that died (or stopped) loses the lock to lease expiry.
register_once('lk_renew', function(keys, args)
  local L = keys[1]
  if redis.call('ZSCORE', L .. ':h', args[1]) == false then return 0 end
  redis.call('ZADD', L .. ':h', 'XX', now_ms() + tonumber(args[2]), args[1])
  return 1
end)

-- lk_release(L; tok, contended, bounce, wait_us, hold_us, lease_ms[, stats])
register_once('lk_release', function(keys, args)
  return lk_release_impl(keys[1], args)
end)

-- Inline holds inside a data function.  A function call is atomic, so when the lock is free
-- at the first critical section of a call nobody can observe it held in between: each
-- critical section is recorded as one uncontended acquisition (with its hold time) and the
-- statistics are written once, at the end of the call.  The common, uncontended case thus
-- costs no round trip and almost no store traffic.
local ILK = nil
local INSIDE = false

local function usec(t0, t1)
  return (tonumber(t1[1]) - tonumber(t0[1])) * 1e6 + tonumber(t1[2]) - tonumber(t0[2])
end

local function ilock_enter(L, cpu)
  if ILK == nil then
    lk_purge(L, now_ms())
    if not lk_free_for(L, 'w') then ILK = {busy = true}; return false end
    local last = redis.call('HGET', L, 'last')
    ILK = {busy = false, L = L, cpu = cpu, n = 0, total = 0, min = -1, max = 0,
           bounce = (last and last ~= tostring(cpu)) and 1 or 0}
  end
  if ILK.busy then return false end
  ILK.t0 = redis.call('TIME')
  INSIDE = true
  return true
end

local function ilock_exit()
  local h = usec(ILK.t0, redis.call('TIME'))
  ILK.n = ILK.n + 1
  ILK.total = ILK.total + h
  if ILK.min < 0 or h < ILK.min then ILK.min = h end
  if h > ILK.max then ILK.max = h end
  INSIDE = false
end

local function ilock_commit()
  local k = ILK
  ILK = nil
  INSIDE = false
  if k == nil or k.busy or k.n == 0 then return end
  local st = k.L .. ':st'
  redis.call('HINCRBY', st, 'acquisitions', k.n)
  redis.call('HINCRBY', st, 'acq_bounces', k.bounce)
  redis.call('HINCRBYFLOAT', st, 'hold_total', k.total)
  local hmn = tonumber(redis.call('HGET', st, 'hold_min') or '-1')
  if hmn < 0 or k.min < hmn then redis.call('HSET', st, 'hold_min', k.min) end
  if k.max > tonumber(redis.call('HGET', st, 'hold_max') or '0') then
    redis.call('HSET', st, 'hold_max', k.max)
  end
  redis.call('HSET', k.L, 'last', k.cpu)
end

-- mm_enter(M; mode, cpu, wid, lease_ms): take mmap_lock and load the address space in one
-- round trip: {-1} no such mm | {0} queued as wid | {1, tok, bounce, info, vmas}.
register_once('mm_enter', function(keys, args)
  local M = keys[1]
  if redis.call('EXISTS', M .. ':info') == 0 then return {-1} end
  local L = M .. ':mmap_lock'
  local mode, cpu, wid, lease_ms = args[1], tonumber(args[2]), args[3], tonumber(args[4])
  local now = now_ms()
  lk_purge(L, now, lease_ms)
  if not lk_free_for(L, mode) then
    redis.call('RPUSH', L .. ':q', wid .. '|' .. mode .. '|' .. cpu)
    return {0}
  end
  local tok, bounce = lk_grant(L, mode, cpu, lease_ms, now)
  local out = {1, tok, bounce, redis.call('HGETALL', M .. ':info'),
               redis.call('HGETALL', M .. ':vma')}
  if args[5] then out[6] = pt_read_range(M, tonumber(args[5]), tonumber(args[6]), true) end
  return out
end)
