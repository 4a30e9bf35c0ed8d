"""Lua scripts of the Redis store's admission: one round trip to decide and reserve every limit
of a request (key, team, global), one to settle, one to renew leases.

Keys per check, all under the store's hash tag so Redis Cluster accepts the script:
  requests     string "level:stamp ms": a token bucket, refilled at the limit per minute
  tokens       the same, in tokens; a settlement gives back what the estimate overshot
  concurrency  zset member -> lease expiry ms
  budget       zset member -> lease expiry ms, hash member -> held nano-USD, string held sum,
               string spent nano-USD of the period
Time is Redis's own (TIME), so replicas with skewed clocks still share one window.
"""

KEY_COUNT = {"requests": 1, "tokens": 1, "concurrency": 1, "budget": 4}
KIND_CODE = {"requests": "r", "tokens": "t", "concurrency": "c", "budget": "b"}

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- a token bucket: "level:stamp", refilled at cap per window, never above cap
local function level_at(state, cap, window)
  if not state then return cap end
  local sep = string.find(state, ':', 1, true)
  local level = tonumber(string.sub(state, 1, sep - 1)) + (now - tonumber(string.sub(state, sep + 1))) * cap / window
  if level > cap then return cap end
  return level
end

local function level_of(key, cap, window)
  return level_at(redis.call('GET', key), cap, window)
end

-- drop expired holds; returns the held sum after that (`held` is its value before)
local function evict(zset, weights, sum, upto, held)
  local old = redis.call('ZRANGEBYSCORE', zset, '-inf', upto)
  if #old > 0 then
    local total = 0
    for _, m in ipairs(old) do
      total = total + (tonumber(redis.call('HGET', weights, m)) or 0)
      redis.call('HDEL', weights, m)
    end
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', upto)
    if total ~= 0 then return redis.call('DECRBY', sum, total) end
  end
  return tonumber(held or '0')
end
"""

# ARGV: member, lease_ms, window_ms, n, then per check: kind, limit, amount, ttl_s
ADMIT = (
    _PRELUDE
    + """
local member, lease, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local checks = {}
local k = 1
for i = 1, n do
  local a = 4 + (i - 1) * 4
  local c = {kind = ARGV[a + 1], limit = tonumber(ARGV[a + 2]), amount = tonumber(ARGV[a + 3]),
             ttl = tonumber(ARGV[a + 4]), k = k}
  if c.kind == 'b' then k = k + 4 else k = k + 1 end
  checks[i] = c
end

-- every bucket and budget sum in one read
local reads = {}
for _, c in ipairs(checks) do
  if c.kind == 'r' or c.kind == 't' then
    reads[#reads + 1] = KEYS[c.k]
    c.r = #reads
  elseif c.kind == 'b' then
    reads[#reads + 1] = KEYS[c.k + 2]
    reads[#reads + 1] = KEYS[c.k + 3]
    c.r = #reads - 1
  end
end
local values = {}
if #reads > 0 then values = redis.call('MGET', unpack(reads)) end

for i, c in ipairs(checks) do
  if c.kind == 'r' or c.kind == 't' then
    c.level = level_at(values[c.r], c.limit, window)
    if c.level < c.amount then
      local used = c.limit - math.floor(c.level)
      if c.amount > c.limit then return {0, i, -1, used} end
      return {0, i, math.ceil((c.amount - c.level) * window / c.limit), used}
    end
  elseif c.kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[c.k], '-inf', now)
    local used = redis.call('ZCARD', KEYS[c.k])
    if used + 1 > c.limit then return {0, i, 1000, used} end
  else
    local used = evict(KEYS[c.k], KEYS[c.k + 1], KEYS[c.k + 2], now, values[c.r]) + tonumber(values[c.r + 1] or '0')
    c.used = used
    if used + c.amount > c.limit then return {0, i, -1, used} end
  end
end

local out = {1}
for _, c in ipairs(checks) do
  local remaining, reset = 0, 0
  if c.kind == 'r' or c.kind == 't' then
    local level = c.level - c.amount
    redis.call('SET', KEYS[c.k], string.format('%.6f:%d', level, now), 'PX', window * 2)
    remaining = math.floor(level)
    if c.limit > 0 then reset = math.ceil((c.limit - level) * window / c.limit) end
  elseif c.kind == 'c' then
    redis.call('ZADD', KEYS[c.k], now + lease, member)
    redis.call('PEXPIRE', KEYS[c.k], lease * 2)
    remaining = c.limit - redis.call('ZCARD', KEYS[c.k])
  else
    redis.call('ZADD', KEYS[c.k], now + lease, member)
    redis.call('HSET', KEYS[c.k + 1], member, c.amount)
    redis.call('INCRBY', KEYS[c.k + 2], c.amount)
    for j = 0, 2 do redis.call('PEXPIRE', KEYS[c.k + j], lease * 2) end
    remaining = c.limit - c.used - c.amount
  end
  table.insert(out, remaining)
  table.insert(out, reset)
end
return out
"""
)

# ARGV: window_ms, n, then per settlement: kind, member, value, ttl_s, limit
SETTLE = (
    _PRELUDE
    + """
local window, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local k = 1
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, member, value, ttl, cap = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
    tonumber(ARGV[a + 5])
  if kind == 't' then
    if value ~= 0 and redis.call('EXISTS', KEYS[k]) == 1 then
      local level = level_of(KEYS[k], cap, window) + value
      if level > cap then level = cap end
      redis.call('SET', KEYS[k], string.format('%.6f:%d', level, now), 'PX', window * 2)
    end
    k = k + 1
  elseif kind == 'c' then
    redis.call('ZREM', KEYS[k], member)
    k = k + 1
  elseif kind == 'b' then
    local held = redis.call('HGET', KEYS[k + 1], member)
    if held then
      redis.call('HDEL', KEYS[k + 1], member)
      redis.call('ZREM', KEYS[k], member)
      redis.call('DECRBY', KEYS[k + 2], tonumber(held))
    end
    redis.call('INCRBY', KEYS[k + 3], value)
    if ttl > 0 then redis.call('EXPIRE', KEYS[k + 3], ttl) end
    k = k + 4
  else
    k = k + 1
  end
end
return n
"""
)

# ARGV: lease_ms, then members; KEYS: one lease zset per member
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
end
return #KEYS
"""

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
