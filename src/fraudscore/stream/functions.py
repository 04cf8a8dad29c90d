"""The Redis function library (Lua) that makes each step of the pipeline one atomic call.

Every function touches the keys of one partition only (``keys.PartitionKeys``), all passed
as KEYS, so each call is atomic on one slot.  The ones that change a partition's state or
its consumer group's deliveries are fenced: they refuse (error ``FSLEASE``) unless the
caller's token is the partition's lease, so a worker that lost its lease (paused, partitioned,
presumed dead) cannot apply, read or claim anything after its successor took over:

- ``fs_publish`` XADDs a chunk of raw events to a partition's stream, all or none: a pipeline
                of XADDs can be cut anywhere (a Redis that finishes loading its data mid-pipeline
                rejects the first commands and runs the rest), and the chunk sent again would then
                put its first events after its last ones.
- ``fs_lease``  acquire (SET NX PX), renew or release a partition's lease.
- ``fs_read``   XREADGROUP ``>`` of new entries (non-blocking: fenced reads cannot block).
- ``fs_claim``  XAUTOCLAIM every pending entry of the group from a cursor, with each entry's
                delivery count (XPENDING): what a new owner runs before reading new entries.
- ``fs_apply``  a batch of events, in order: for each, idempotency by event id, the state
                before the event, the state change.  A repeat (redelivery or duplicate publish)
                returns the state stored with the first application, so it gets the same
                features; 0 once the event's result is written.  One call per batch: the
                per-call cost of a function is paid once, not once per event.
- ``fs_results`` for each event of a batch: writes its result unless its record says it was
                written, then XACKs its entry.
- ``fs_dead``   XACKs a pending entry and, only if it was still pending, dead-letters it.
- ``fs_trim``   trims the events stream below the oldest entry some group has not acknowledged,
                and forgets idle consumers that have nothing pending.

Amounts are integer cents (HINCRBY, exact) and coordinates and times are stored as the strings
the worker sent, never turned into Lua numbers, so the state reads back bit for bit.
"""

from __future__ import annotations

LIBRARY_NAME = "fraudscore"

LIBRARY = r"""#!lua name=fraudscore

local function holds(lease, token)
  return redis.call('GET', lease) == token
end

local lost = 'FSLEASE the partition lease is not held by this worker'

-- KEYS: events; ARGV: raw events -> the number added.  Not fenced: producers hold no lease.
local function publish(keys, args)
  for i = 1, #args do redis.call('XADD', keys[1], '*', 'event', args[i]) end
  return #args
end

-- KEYS: lease; ARGV: token, op (acquire | renew | release), ttl ms
local function lease(keys, args)
  local op = args[2]
  if op == 'acquire' then
    if redis.call('SET', keys[1], args[1], 'NX', 'PX', args[3]) then return 1 end
    return 0
  end
  if not holds(keys[1], args[1]) then return 0 end
  if op == 'renew' then
    redis.call('PEXPIRE', keys[1], args[3])
  else
    redis.call('DEL', keys[1])
  end
  return 1
end

-- KEYS: lease, events; ARGV: token, group, consumer, count
local function read(keys, args)
  if not holds(keys[1], args[1]) then return redis.error_reply(lost) end
  return redis.call('XREADGROUP', 'GROUP', args[2], args[3], 'COUNT', args[4], 'STREAMS', keys[2], '>')
end

-- KEYS: lease, events; ARGV: token, group, consumer, cursor, count
-- -> {next cursor, entries, XPENDING rows of those entries (id, consumer, idle, deliveries), deleted ids}
local function claim(keys, args)
  if not holds(keys[1], args[1]) then return redis.error_reply(lost) end
  local r = redis.call('XAUTOCLAIM', keys[2], args[2], args[3], 0, args[4], 'COUNT', args[5])
  local entries = r[2]
  local rows = {}
  if #entries > 0 then
    rows = redis.call('XPENDING', keys[2], args[2], entries[1][1], entries[#entries][1], #entries)
  end
  return {r[1], entries, rows, r[3] or {}}
end

-- A customer's state is one hash: 'sum' (cents, added by HINCRBY: exact beyond 2^53) and 's',
-- msgpack of {n, t, lat, lon, hlat, hlon, window times (ascending), merchants (most recent
-- first)}.  One read and one write per event, where a key per structure cost a dozen calls.
-- Times are ms since the epoch, exact in a Lua number; t, lat, lon, hlat and hlon stay the
-- strings the worker sent.
local function customer_state(packed)
  if packed and packed ~= '' then return cmsgpack.unpack(packed) end
  return {0, '', '', '', false, false, {}, {}}
end

-- fs_apply's reply for one event: the state before it
local function before(s, sum, count, mn, msum)
  local pre = {tostring(s[1]), sum, s[2], s[3], s[4], s[5] or '', s[6] or '', count, mn, msum}
  local merchants = s[8]
  for i = 1, #merchants do pre[10 + i] = merchants[i] end
  return pre
end

-- KEYS: lease, then per event: record, customer, merchant
-- ARGV: token, window cap, known merchants cap, state ttl s, record ttl s,
--       then per event: event id, time ms, window low (time - window), cents, merchant id,
--       lat, lon, home lat, home lon ('' = none)
-- -> per event, in order: 0 when its result is written; else the state before it,
--    {n, sum, t, lat, lon, hlat, hlon, window count, merchant n, merchant sum, known merchants...}
-- The events are applied one after the other, so a customer's second event in the batch sees
-- the first one's change.  The record is a string: 'p' .. what that state is made of, then
-- 'r' .. the result's entry id.
local function apply(keys, args)
  if not holds(keys[1], args[1]) then return redis.error_reply(lost) end
  local window_cap, known_cap = tonumber(args[2]), tonumber(args[3])
  local state_ttl, record_ttl = args[4], args[5]
  local out, touched = {}, {}
  local a = 6
  for e = 2, #keys, 3 do
    local record, customer, merchant = keys[e], keys[e + 1], keys[e + 2]
    local seen = redis.call('GET', record)
    if seen then
      if string.sub(seen, 1, 1) == 'r' then
        out[#out + 1] = 0
      else  -- 'p' sum,count,merchant n,merchant sum '|' the customer's packed state as it was
        local bar = string.find(seen, '|', 2, true)
        local head = string.sub(seen, 2, bar - 1)
        local sum, count, mn, msum = string.match(head, '^([^,]*),([^,]*),([^,]*),(.*)$')
        out[#out + 1] = before(customer_state(string.sub(seen, bar + 1)), sum, tonumber(count), mn, msum)
      end
    else
      local t, cents, mid = args[a + 1], args[a + 3], args[a + 4]
      local time, low = tonumber(t), tonumber(args[a + 2])
      local c = redis.call('HMGET', customer, 's', 'sum')
      local s = customer_state(c[1])
      local m = redis.call('HMGET', merchant, 'n', 'sum')
      local times, merchants = s[7], s[8]

      -- the window: drop times before low; count those in [low, time]
      local drop = 0
      local size = #times
      while drop < size and times[drop + 1] < low do drop = drop + 1 end
      if drop > 0 then  -- in place: a new table per event costs more than the moves
        for i = 1, size - drop do times[i] = times[i + drop] end
        for i = size - drop + 1, size do times[i] = nil end
      end
      local count = 0
      while count < #times and times[count + 1] <= time do count = count + 1 end

      local sum, mn, msum = c[2] or '0', m[1] or '0', m[2] or '0'
      local pre = before(s, sum, count, mn, msum)
      -- the record keeps the packed state as read (no second packing): a repeat rebuilds pre from it
      redis.call('SET', record, 'p' .. sum .. ',' .. count .. ',' .. mn .. ',' .. msum .. '|' .. (c[1] or ''),
        'EX', record_ttl)

      -- the change: time goes after the times not later than it, the window keeps its newest
      -- window_cap times; the merchant moves to the front, the list keeps known_cap
      table.insert(times, count + 1, time)
      if #times > window_cap then table.remove(times, 1) end
      local at = #merchants + 1  -- where mid was (or one past the end), then the list shifts right to it
      for i = 1, #merchants do
        if merchants[i] == mid then at = i break end
      end
      for i = at, 2, -1 do merchants[i] = merchants[i - 1] end
      merchants[1] = mid
      if #merchants > known_cap then merchants[#merchants] = nil end
      local known = merchants
      local lat, lon = args[a + 5], args[a + 6]
      local hlat, hlon = s[5], s[6]
      if args[a + 7] ~= '' then
        hlat, hlon = args[a + 7], args[a + 8]
      elseif not hlat then
        hlat, hlon = lat, lon
      end
      redis.call('HSET', customer, 's', cmsgpack.pack({s[1] + 1, t, lat, lon, hlat, hlon, times, known}))
      redis.call('HINCRBY', customer, 'sum', cents)
      redis.call('HINCRBY', merchant, 'n', 1)
      redis.call('HINCRBY', merchant, 'sum', cents)
      touched[customer], touched[merchant] = true, true
      out[#out + 1] = pre
    end
    a = a + 9
  end
  -- once per key, not per event: the call is atomic, so the TTL still counts from the last write
  for key in pairs(touched) do redis.call('EXPIRE', key, state_ttl) end
  return out
end

-- KEYS: results, events, the record of each event
-- ARGV: group, results maxlen, record ttl s, k, k field names, then per event: entry id, k values
-- Writes each event's result unless its record says it was written, then XACKs every entry.
local function results(keys, args)
  local k = tonumber(args[4])
  local pos = 5 + k
  local ids = {}
  local acked = 0
  local xadd = {'XADD', keys[1], 'MAXLEN', '~', args[2], '*'}  -- then names and values, rewritten per event
  for i = 1, k do xadd[5 + 2 * i] = args[4 + i] end
  for e = 3, #keys do
    local seen = redis.call('GET', keys[e])
    if not (seen and string.sub(seen, 1, 1) == 'r') then
      for i = 1, k do xadd[6 + 2 * i] = args[pos + i] end
      local id = redis.call(unpack(xadd))
      redis.call('SET', keys[e], 'r' .. id, 'EX', args[3])
    end
    ids[#ids + 1] = args[pos]
    if #ids == 1000 then  -- unpack's limit is far above, but a call's arguments need not grow without bound
      acked = acked + redis.call('XACK', keys[2], args[1], unpack(ids))
      ids = {}
    end
    pos = pos + 1 + k
  end
  if #ids > 0 then acked = acked + redis.call('XACK', keys[2], args[1], unpack(ids)) end
  return acked
end

-- KEYS: dead, events; ARGV: group, entry id, dead maxlen, field, value, ...
local function dead(keys, args)
  if redis.call('XACK', keys[2], args[1], args[2]) == 0 then return 0 end
  redis.call('XADD', keys[1], 'MAXLEN', '~', args[3], '*', unpack(args, 4))
  return 1
end

local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end

-- KEYS: events; ARGV: idle ms -> entries trimmed.  Also forgets consumers idle that long with
-- nothing pending (each worker process is a new consumer; a reader recreates its own).
local function trim(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 then return 0 end
  local floor = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local mark = info['last-delivered-id']
    if info['pending'] > 0 then mark = redis.call('XPENDING', keys[1], info['name'])[2] end
    if floor == nil or older(mark, floor) then floor = mark end
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', keys[1], info['name'])) do
      local consumer = {}
      for i = 1, #c, 2 do consumer[c[i]] = c[i + 1] end
      if consumer['pending'] == 0 and consumer['idle'] > tonumber(args[1]) then
        redis.call('XGROUP', 'DELCONSUMER', keys[1], info['name'], consumer['name'])
      end
    end
  end
  if floor == nil then return 0 end
  return redis.call('XTRIM', keys[1], 'MINID', floor)
end

redis.register_function('fs_publish', publish)
redis.register_function('fs_lease', lease)
redis.register_function('fs_read', read)
redis.register_function('fs_claim', claim)
redis.register_function('fs_apply', apply)
redis.register_function('fs_results', results)
redis.register_function('fs_dead', dead)
redis.register_function('fs_trim', trim)
"""
