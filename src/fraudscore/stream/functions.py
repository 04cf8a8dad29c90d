"""The Redis function library (Lua) that makes each step of the pipeline one atomic call.

Every function touches the keys of one partition only (``keys.PartitionKeys``), all passed
as KEYS, so each call is atomic on one slot.  The ones that change a partition's state or
its consumer group's deliveries are fenced: they refuse (error ``FSLEASE``) unless the
caller's token is the partition's lease, so a worker that lost its lease (paused, partitioned,
presumed dead) cannot apply, read or claim anything after its successor took over:

- ``fs_lease``  acquire (SET NX PX), renew or release a partition's lease.
- ``fs_read``   XREADGROUP ``>`` of new entries (non-blocking: fenced reads cannot block).
- ``fs_claim``  XAUTOCLAIM every pending entry of the group from a cursor, with each entry's
                delivery count (XPENDING): what a new owner runs before reading new entries.
- ``fs_apply``  one event: idempotency by event id, the state before the event, the state
                change.  A repeat (redelivery or duplicate publish) returns the state stored
                with the first application, so it gets the same features; ``!done`` once the
                event's result is written.
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

-- KEYS: lease, record, customer, window, known, merchant
-- ARGV: token, event id, time ms, cents, merchant id, lat, lon, home lat, home lon ('' = none),
--       window low (time - window), window rank to trim to, known merchants cap, state ttl s, record ttl s
local function apply(keys, args)
  if not holds(keys[1], args[1]) then return redis.error_reply(lost) end
  local seen = redis.call('HMGET', keys[2], 'pre', 'res')
  if seen[1] then return seen[1] end
  if seen[2] then return '!done' end
  local c = redis.call('HMGET', keys[3], 'n', 'sum', 't', 'lat', 'lon', 'hlat', 'hlon')
  redis.call('ZREMRANGEBYSCORE', keys[4], '-inf', '(' .. args[10])
  local m = redis.call('HMGET', keys[6], 'n', 'sum')
  local known = redis.call('ZREVRANGE', keys[5], 0, -1)
  local pre = cjson.encode({
    n = c[1] or '0', sum = c[2] or '0', t = c[3] or '', lat = c[4] or '', lon = c[5] or '',
    hlat = c[6] or '', hlon = c[7] or '',
    w = redis.call('ZCOUNT', keys[4], args[10], args[3]),
    k = known,
    mn = m[1] or '0', msum = m[2] or '0',
  })
  redis.call('HSET', keys[2], 'pre', pre)
  redis.call('EXPIRE', keys[2], args[14])

  -- the event count stays far below 2^53, so Lua's number formatting keeps it exact; the sum of
  -- cents need not, so Redis adds it (HINCRBY)
  local n = (tonumber(c[1]) or 0) + 1
  local hlat, hlon = c[6], c[7]
  if args[8] ~= '' then
    hlat, hlon = args[8], args[9]
  elseif not hlat then
    hlat, hlon = args[6], args[7]
  end
  redis.call('HSET', keys[3], 'n', n, 't', args[3], 'lat', args[6], 'lon', args[7],
    'hlat', hlat, 'hlon', hlon)
  redis.call('HINCRBY', keys[3], 'sum', args[4])
  redis.call('ZADD', keys[4], args[3], args[2])
  redis.call('ZREMRANGEBYRANK', keys[4], 0, args[11])
  redis.call('ZADD', keys[5], n, args[5])
  if #known >= tonumber(args[12]) then  -- at the cap: one more may have come in
    redis.call('ZREMRANGEBYRANK', keys[5], 0, -(tonumber(args[12]) + 1))
  end
  redis.call('HINCRBY', keys[6], 'n', 1)
  redis.call('HINCRBY', keys[6], 'sum', args[4])
  for i = 3, 6 do redis.call('EXPIRE', keys[i], args[13]) end
  return pre
end

-- KEYS: results, events, the record of each event
-- ARGV: group, results maxlen, record ttl s, k, k field names, then per event: entry id, k values
local function results(keys, args)
  local k = tonumber(args[4])
  local pos = 5 + k
  local acked = 0
  for e = 3, #keys do
    if redis.call('HEXISTS', keys[e], 'res') == 0 then
      local fields = {}
      for i = 1, k do
        fields[2 * i - 1] = args[4 + i]
        fields[2 * i] = args[pos + i]
      end
      local id = redis.call('XADD', keys[1], 'MAXLEN', '~', args[2], '*', unpack(fields))
      redis.call('HSET', keys[e], 'res', id)
      redis.call('HDEL', keys[e], 'pre')
      redis.call('EXPIRE', keys[e], args[3])
    end
    acked = acked + redis.call('XACK', keys[2], args[1], args[pos])
    pos = pos + 1 + k
  end
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

redis.register_function('fs_lease', lease)
redis.register_function('fs_read', read)
redis.register_function('fs_claim', claim)
redis.register_function('fs_apply', apply)
redis.register_function('fs_results', results)
redis.register_function('fs_dead', dead)
redis.register_function('fs_trim', trim)
"""
