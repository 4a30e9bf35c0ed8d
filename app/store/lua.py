"""Lua scripts of the Redis store's admission: one round trip to decide and reserve every limit
of a request (key, team, global), one to settle, one to renew leases, and a sweep.

Layout, under the store's hash tag so Redis Cluster accepts every script:
  {p}:limits            one hash, a field per limit (the check's name):
                          requests, tokens  "level:stamp"  a token bucket, refilled at the limit per
                                                           window; untouched for two windows = full
                          concurrency       "n:bound"      leases held; no lease expires before bound
                          budget            "held:n:bound" nano-USD held by n leases; likewise
  {p}:leases:<name>     zset member -> lease expiry ms (budget members: "member|nano-USD held")
  {p}:lim:<name>:spent  string: settled nano-USD of the budget's period, kept for its ttl

Every call to Redis from a script costs a few microseconds, more than the arithmetic around it,
so the state a request reads is one HMGET (and one MGET of budget spends), what it writes one
HSET plus one ZADD per lease. Expired leases are swept from a zset only once its bound has
passed, and counted again from the zset then.
A missing field means full (buckets) or nothing held (leases). Lease zsets and the hash have no
TTL, and spend is money: the Redis behind the gateway must not evict keys (`maxmemory-policy
noeviction`, Redis's default). Time is Redis's own (TIME), so replicas with skewed clocks still
share one window.
"""

KIND_CODE = {"requests": "r", "tokens": "t", "concurrency": "c", "budget": "b"}

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- a token bucket: "level:stamp", refilled at cap per window, never above cap
local function level_at(state, cap, window)
  if not state then return cap end
  local sep = string.find(state, ':', 1, true)
  local stamp = tonumber(string.sub(state, sep + 1))
  if now - stamp >= 2 * window then return cap end  -- idle that long: full, whatever it owed
  local level = tonumber(string.sub(state, 1, sep - 1)) + (now - stamp) * cap / window
  if level > cap then return cap end
  return level
end

local function bucket(level)
  return string.format('%.6f:%d', level, now)
end

-- a lease field: held (budgets; 0 for concurrency), n, bound
local function leases_of(state, budget)
  if not state then return 0, 0, 0 end
  if budget then
    local held, n, bound = string.match(state, '^(%-?%d+):(%d+):(%d+)$')
    return tonumber(held), tonumber(n), tonumber(bound)
  end
  local n, bound = string.match(state, '^(%d+):(%d+)$')
  return 0, tonumber(n), tonumber(bound)
end

local function lease_field(held, n, bound, budget)
  if n <= 0 then return false end  -- nothing held: the field goes
  if budget then return string.format('%d:%d:%d', held, n, bound) end
  return string.format('%d:%d', n, bound)
end

-- drop expired leases and count what is left from the zset itself
local function recount(zset, budget)
  redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
  if budget then
    local rest = redis.call('ZRANGE', zset, 0, -1, 'WITHSCORES')
    local held = 0
    for j = 1, #rest, 2 do held = held + (tonumber(string.match(rest[j], '|(%-?%d+)$')) or 0) end
    return held, #rest / 2, tonumber(rest[2]) or 0
  end
  local first = redis.call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then return 0, 0, 0 end
  return 0, redis.call('ZCARD', zset), tonumber(first[2])
end

-- a lease field's counts, recounted from its zset once a lease may have expired (true then)
local function current(state, zset, budget)
  local held, n, bound = leases_of(state, budget)
  if bound ~= 0 and bound <= now then
    held, n, bound = recount(zset, budget)
    return held, n, bound, true
  end
  return held, n, bound, false
end

-- field/value pairs to write; false: delete the field
local function write(hash, changes)
  local set, gone = {}, {}
  for f, v in pairs(changes) do
    if v then set[#set + 1] = f; set[#set + 1] = v else gone[#gone + 1] = f end
  end
  if #set > 0 then redis.call('HSET', hash, unpack(set)) end
  if #gone > 0 then redis.call('HDEL', hash, unpack(gone)) end
end
"""

# KEYS: the limits hash, then per check: concurrency its leases; budget its leases and spend
# ARGV: member, lease_ms, window_ms, n, headroom, then per check: kind, name, limit, amount.
# headroom: how many requests of these amounts must fit for this one to be admitted (1; 2 when a
# request's worth is reserved ahead, so a reservation ahead never takes a limit's last room).
ADMIT = (
    _PRELUDE
    + """
local member, lease, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local headroom = tonumber(ARGV[5])
local checks, fields, spends = {}, {}, {}
local k = 2
for i = 1, n do
  local a = 5 + (i - 1) * 4
  local c = {kind = ARGV[a + 1], name = ARGV[a + 2], limit = tonumber(ARGV[a + 3]), amount = tonumber(ARGV[a + 4]),
             raw = ARGV[a + 4]}
  if c.kind == 'c' then
    c.zset = KEYS[k]; k = k + 1
  elseif c.kind == 'b' then
    c.zset = KEYS[k]; spends[#spends + 1] = KEYS[k + 1]; c.s = #spends; k = k + 2
  end
  checks[i] = c
  fields[i] = c.name
end

-- every limit's state in one read, and every budget's spend in another
local values = redis.call('HMGET', KEYS[1], unpack(fields))
local spent = {}
if #spends > 0 then spent = redis.call('MGET', unpack(spends)) end

local changes = {}
for i, c in ipairs(checks) do
  if c.kind == 'r' or c.kind == 't' then
    c.level = level_at(values[i], c.limit, window)
    if c.level < c.amount * headroom then
      write(KEYS[1], changes)
      local used = c.limit - math.floor(c.level)
      if c.amount > c.limit then return {0, i, -1, used} end
      return {0, i, math.ceil((c.amount - c.level) * window / c.limit), used}
    end
  else
    local budget = c.kind == 'b'
    local recounted
    c.held, c.n, c.bound, recounted = current(values[i], c.zset, budget)
    if recounted then changes[c.name] = lease_field(c.held, c.n, c.bound, budget) end  -- kept even if refused
    if budget then
      c.used = c.held + tonumber(spent[c.s] or '0')
      if c.used + c.amount * headroom > c.limit then write(KEYS[1], changes); return {0, i, -1, c.used} end
    elseif c.n + headroom > c.limit then
      write(KEYS[1], changes)
      return {0, i, 1000, c.n}
    end
  end
end

local out = {1}
local expiry = now + lease
for _, c in ipairs(checks) do
  local remaining, reset = 0, 0
  if c.kind == 'r' or c.kind == 't' then
    local level = c.level - c.amount
    changes[c.name] = bucket(level)
    remaining = math.floor(level)
    if c.limit > 0 then reset = math.ceil((c.limit - level) * window / c.limit) end
  else
    local budget = c.kind == 'b'
    local bound = c.bound
    if bound == 0 or expiry < bound then bound = expiry end
    if budget then
      redis.call('ZADD', c.zset, expiry, member .. '|' .. c.raw)
      changes[c.name] = lease_field(c.held + c.amount, c.n + 1, bound, true)
      remaining = c.limit - c.used - c.amount
    else
      redis.call('ZADD', c.zset, expiry, member)
      changes[c.name] = lease_field(0, c.n + 1, bound, false)
      remaining = c.limit - c.n - 1
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
end
write(KEYS[1], changes)
return out
"""
)

# KEYS: the limits hash, the batch's marker, then per settlement: concurrency its leases; budget
# its leases and spend. ARGV: window_ms, n, then per settlement: kind, name, member, value, limit,
# amount, ttl_s. A batch is applied at most once (its marker), however often it is sent: a reply
# lost to a timeout after Redis ran the script must not count the spend twice when retried. The
# marker lives two minutes (a retry comes within a second or two unless Redis is gone; a key per
# batch for days would cost gigabytes at thousands of requests a second).
SETTLE = (
    _PRELUDE
    + """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', 120) then return 0 end
local window, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local items, fields = {}, {}
local k = 3
for i = 1, n do
  local a = 2 + (i - 1) * 7
  local s = {kind = ARGV[a + 1], name = ARGV[a + 2], member = ARGV[a + 3], value = tonumber(ARGV[a + 4]),
             limit = tonumber(ARGV[a + 5]), amount = ARGV[a + 6], ttl = tonumber(ARGV[a + 7])}
  if s.kind == 'c' then
    s.zset = KEYS[k]; k = k + 1
  elseif s.kind == 'b' then
    s.zset = KEYS[k]; s.spend = KEYS[k + 1]; k = k + 2
  end
  items[i] = s
  fields[i] = s.name
end
local values = redis.call('HMGET', KEYS[1], unpack(fields))
local state, changes = {}, {}  -- by field: a batch may settle several requests of one limit
for i, s in ipairs(items) do
  if state[s.name] == nil then state[s.name] = values[i] end
end

for _, s in ipairs(items) do
  if s.kind == 't' or s.kind == 'r' then  -- tokens given back ('r': a reservation ahead, unused)
    local v = state[s.name]
    if s.value ~= 0 and v then
      local level = level_at(v, s.limit, window) + s.value
      if level > s.limit then level = s.limit end
      state[s.name] = bucket(level)
      changes[s.name] = state[s.name]
    end
  elseif s.kind == 'c' or s.kind == 'b' then
    local budget = s.kind == 'b'
    local member = s.member
    if budget then member = member .. '|' .. s.amount end
    if redis.call('ZREM', s.zset, member) == 1 then
      local held, count, bound = leases_of(state[s.name], budget)
      count = count - 1
      if budget then held = held - tonumber(s.amount) end
      if count <= 0 then held, count, bound = 0, 0, 0 end
      state[s.name] = lease_field(held, count, bound, budget) or nil
      changes[s.name] = state[s.name] or false
    end
    if budget then
      local total = redis.call('INCRBY', s.spend, s.value)
      if s.ttl > 0 and total == s.value then redis.call('EXPIRE', s.spend, s.ttl) end
    end
  end
end
write(KEYS[1], changes)
return n
"""
)

# KEYS: one lease zset per member; ARGV: lease_ms, then members
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
end
return #KEYS
"""

# KEYS: the limits hash, then per field its leases zset; ARGV: window_ms, then field names.
# Drops the fields that say nothing (full buckets, no leases) and leases that expired unrenewed.
SWEEP = (
    _PRELUDE
    + """
local window = tonumber(ARGV[1])
local changes = {}
for i = 2, #ARGV do
  local name = ARGV[i]
  local v = redis.call('HGET', KEYS[1], name)
  if v then
    local kind = string.sub(name, 1, 1)
    if kind == 'r' or kind == 't' then
      local stamp = tonumber(string.match(v, ':(%d+)$'))
      if not stamp or now - stamp >= 2 * window then changes[name] = false end
    elseif kind == 'c' or kind == 'b' then
      local budget = kind == 'b'
      local held, count, bound = current(v, KEYS[i], budget)
      local after = lease_field(held, count, bound, budget)
      if after ~= v then changes[name] = after end
    end
  end
end
write(KEYS[1], changes)
return 1
"""
)

# KEYS: batch marker, key-names hash, then one hash per day in the batch
# ARGV: marker ttl, number of days, per day: count, then field/value pairs; then key-name pairs
LEDGER_APPLY = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
local days = tonumber(ARGV[2])
local a = 3
for d = 1, days do
  local count = tonumber(ARGV[a])
  a = a + 1
  for i = 1, count do
    redis.call('HINCRBY', KEYS[2 + d], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
end
while a <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[a], ARGV[a + 1])
  a = a + 2
end
return 1
"""
