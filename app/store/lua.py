"""Lua scripts of the Redis store's admission: one round trip to decide and reserve every limit
of a request (key, team, global), one to settle, one to renew leases.

Keys per check, all under the store's hash tag so Redis Cluster accepts the script:
  requests     zset member -> arrival ms
  tokens       zset member -> arrival ms, hash member -> tokens, string sum of live tokens
  concurrency  zset member -> lease expiry ms
  budget       zset member -> lease expiry ms, hash member -> held nano-USD, string held sum,
               string spent nano-USD of the period
Time is Redis's own (TIME), so replicas with skewed clocks still share one window.
"""

KEY_COUNT = {"requests": 1, "tokens": 3, "concurrency": 1, "budget": 4}
KIND_CODE = {"requests": "r", "tokens": "t", "concurrency": "c", "budget": "b"}

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function evict(zset, weights, sum, upto)
  local old = redis.call('ZRANGEBYSCORE', zset, '-inf', upto)
  if #old > 0 then
    local total = 0
    for _, m in ipairs(old) do
      total = total + (tonumber(redis.call('HGET', weights, m)) or 0)
      redis.call('HDEL', weights, m)
    end
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', upto)
    if total ~= 0 then redis.call('DECRBY', sum, total) end
  end
  return tonumber(redis.call('GET', sum) or '0')
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
  if c.kind == 't' then k = k + 3 elseif c.kind == 'b' then k = k + 4 else k = k + 1 end
  checks[i] = c
end

for i, c in ipairs(checks) do
  local used, retry = 0, 0
  if c.kind == 'r' then
    redis.call('ZREMRANGEBYSCORE', KEYS[c.k], '-inf', now - window)
    used = redis.call('ZCARD', KEYS[c.k])
    if used + 1 > c.limit then
      local oldest = redis.call('ZRANGE', KEYS[c.k], 0, 0, 'WITHSCORES')
      retry = (oldest[2] and (tonumber(oldest[2]) + window - now)) or window
      if c.limit < 1 then retry = -1 end
      return {0, i, retry, used}
    end
  elseif c.kind == 't' then
    used = evict(KEYS[c.k], KEYS[c.k + 1], KEYS[c.k + 2], now - window)
    if used + c.amount > c.limit then
      if c.amount > c.limit then return {0, i, -1, used} end
      retry = window
      local freed = 0
      local entries = redis.call('ZRANGE', KEYS[c.k], 0, -1, 'WITHSCORES')
      for j = 1, #entries, 2 do
        freed = freed + (tonumber(redis.call('HGET', KEYS[c.k + 1], entries[j])) or 0)
        if used - freed + c.amount <= c.limit then
          retry = tonumber(entries[j + 1]) + window - now
          break
        end
      end
      return {0, i, retry, used}
    end
  elseif c.kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[c.k], '-inf', now)
    used = redis.call('ZCARD', KEYS[c.k])
    if used + 1 > c.limit then return {0, i, 1000, used} end
  else
    local held = evict(KEYS[c.k], KEYS[c.k + 1], KEYS[c.k + 2], now)
    used = held + tonumber(redis.call('GET', KEYS[c.k + 3]) or '0')
    if used + c.amount > c.limit then return {0, i, -1, used} end
  end
end

local out = {1}
for _, c in ipairs(checks) do
  local remaining, reset = 0, 0
  if c.kind == 'r' or c.kind == 't' then
    redis.call('ZADD', KEYS[c.k], now, member)
    redis.call('PEXPIRE', KEYS[c.k], window * 2)
    local total
    if c.kind == 'r' then
      total = redis.call('ZCARD', KEYS[c.k])
    else
      redis.call('HINCRBY', KEYS[c.k + 1], member, c.amount)
      total = redis.call('INCRBY', KEYS[c.k + 2], c.amount)
      redis.call('PEXPIRE', KEYS[c.k + 1], window * 2)
      redis.call('PEXPIRE', KEYS[c.k + 2], window * 2)
    end
    local oldest = redis.call('ZRANGE', KEYS[c.k], 0, 0, 'WITHSCORES')
    remaining = c.limit - total
    reset = tonumber(oldest[2]) + window - now
  elseif c.kind == 'c' then
    redis.call('ZADD', KEYS[c.k], now + lease, member)
    redis.call('PEXPIRE', KEYS[c.k], lease * 2)
    remaining = c.limit - redis.call('ZCARD', KEYS[c.k])
  else
    redis.call('ZADD', KEYS[c.k], now + lease, member)
    redis.call('HSET', KEYS[c.k + 1], member, c.amount)
    local held = redis.call('INCRBY', KEYS[c.k + 2], c.amount)
    for j = 0, 2 do redis.call('PEXPIRE', KEYS[c.k + j], lease * 2) end
    remaining = c.limit - held - tonumber(redis.call('GET', KEYS[c.k + 3]) or '0')
  end
  table.insert(out, remaining)
  table.insert(out, reset)
end
return out
"""
)

# ARGV: n, then per settlement: kind, member, actual, ttl_s
SETTLE = """
local n = tonumber(ARGV[1])
local k = 1
for i = 1, n do
  local a = 1 + (i - 1) * 4
  local kind, member, actual, ttl = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if kind == 't' then
    local old = redis.call('HGET', KEYS[k + 1], member)
    if old then
      redis.call('HSET', KEYS[k + 1], member, actual)
      redis.call('INCRBY', KEYS[k + 2], actual - tonumber(old))
    end
    k = k + 3
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
    redis.call('INCRBY', KEYS[k + 3], actual)
    if ttl > 0 then redis.call('EXPIRE', KEYS[k + 3], ttl) end
    k = k + 4
  else
    k = k + 1
  end
end
return n
"""

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
