"""Lua scripts of the Redis store's admission: one round trip to decide and reserve every limit
of a request (key, team, global), one to settle a batch of requests (with the reservations ahead
made when they end), one to renew leases, and a sweep.

Layout, under the store's hash tag so Redis Cluster accepts every script:
  {p}:limits            one hash, a field per limit (the check's name):
                          requests, tokens  "level:stamp"  a token bucket, refilled at the limit per
                                                           window; untouched for two windows = full
                          concurrency       "n:bound"      leases held; no lease expires before bound
                          budget            "held:n:bound" nano-USD held by n leases; likewise
  {p}:leases:<name>     zset member -> lease expiry ms (budget members: "member|nano-USD held")
  {p}:lim:<name>:spent  string: settled nano-USD of the budget's period, kept for its ttl

Every call to Redis from a script costs a few microseconds, more than the arithmetic around it,
and formatting or parsing a number about one, so a script reads its fields with one HMGET (and
one MGET of budget spends per admission), keeps them as strings in memory while it works, and
writes each changed field once, with one HSET, plus one ZADD per lease. Expired leases are swept
from a zset only once its bound has passed, and counted again from the zset then.
A missing field means full (buckets) or nothing held (leases). Lease zsets and the hash have no
TTL, and spend is money: the Redis behind the gateway must not evict keys (`maxmemory-policy
noeviction`, Redis's default). Time is Redis's own (TIME), so replicas with skewed clocks still
share one window.
"""

KIND_CODE = {"requests": "r", "tokens": "t", "concurrency": "c", "budget": "b"}

_PRELUDE = """
local call, tonumber, floor, ceil = redis.call, tonumber, math.floor, math.ceil
local find, sub, match, format = string.find, string.sub, string.match, string.format
local t = call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)

-- a token bucket: "level:stamp", refilled at cap per window, never above cap
local function level_at(state, cap, window)
  if not state then return cap end
  local sep = find(state, ':', 1, true)
  local stamp = tonumber(sub(state, sep + 1))
  if now - stamp >= 2 * window then return cap end  -- idle that long: full, whatever it owed
  local level = tonumber(sub(state, 1, sep - 1)) + (now - stamp) * cap / window
  if level > cap then return cap end
  return level
end

local stamp = format(':%d', now)  -- formatted once: formatting numbers is most of a script's time
local function bucket(level)
  return format('%.6f', level) .. stamp
end

-- a lease field: held (budgets; 0 for concurrency), n, bound
local function leases_of(state, budget)
  if not state then return 0, 0, 0 end
  if budget then
    local held, n, bound = match(state, '^(%-?%d+):(%d+):(%d+)$')
    return tonumber(held), tonumber(n), tonumber(bound)
  end
  local n, bound = match(state, '^(%d+):(%d+)$')
  return 0, tonumber(n), tonumber(bound)
end

local function lease_field(held, n, bound, budget)
  if n <= 0 then return false end  -- nothing held: the field goes
  if budget then return format('%d:%d:%d', held, n, bound) end
  return format('%d:%d', n, bound)
end

-- drop expired leases and count what is left from the zset itself
local function recount(zset, budget)
  call('ZREMRANGEBYSCORE', zset, '-inf', now)
  if budget then
    local rest = call('ZRANGE', zset, 0, -1, 'WITHSCORES')
    local held = 0
    for j = 1, #rest, 2 do held = held + (tonumber(match(rest[j], '|(%-?%d+)$')) or 0) end
    return held, #rest / 2, tonumber(rest[2]) or 0
  end
  local first = call('ZRANGE', zset, 0, 0, 'WITHSCORES')
  if #first == 0 then return 0, 0, 0 end
  return 0, call('ZCARD', zset), tonumber(first[2])
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

-- field/value pairs as a flat list (false: delete the field)
local function write(hash, pairs_)
  local set, gone = {}, {}
  for j = 1, #pairs_, 2 do
    local v = pairs_[j + 1]
    if v then set[#set + 1] = pairs_[j]; set[#set + 1] = v else gone[#gone + 1] = pairs_[j] end
  end
  if #set > 0 then call('HSET', hash, unpack(set)) end
  if #gone > 0 then call('HDEL', hash, unpack(gone)) end
end
"""

# The limits hash's fields a script reads (one HMGET) and changes in memory, written once at the
# end (one HSET); and admission against them, shared by ADMIT and by SETTLE's reservations ahead.
_STATE = """
local state, changed = {}, {}  -- field -> value (false: none); changed: the fields to write, in order
local function load(first, count)  -- the fields named at ARGV[first ...]
  local values = call('HMGET', KEYS[1], unpack(ARGV, first, first + count - 1))
  for i = 1, count do
    local name = ARGV[first + i - 1]
    if state[name] == nil then state[name] = values[i] end
  end
end
local function put(name, value)
  if not changed[name] then changed[name] = true; changed[#changed + 1] = name end
  state[name] = value
end
local function flush()
  local pairs_ = {}
  for j = 1, #changed do pairs_[#pairs_ + 1] = changed[j]; pairs_[#pairs_ + 1] = state[changed[j]] end
  write(KEYS[1], pairs_)
end

-- Judge n checks (names at ARGV[names + 1 ...], then kind, limit, amount each at ARGV[a + 1 ...];
-- spends of the budgets at KEYS[ks ...], leases of concurrency and budgets at KEYS[kl ...]) and
-- reserve all of them if all pass: {1, remaining, reset, ...}, or {0, index, retry_ms, used}.
local function admit(member, lease, window, headroom, n, names, a, budgets, ks, kl)
  local spent = {}
  if budgets > 0 then spent = call('MGET', unpack(KEYS, ks, ks + budgets - 1)) end
  local set, out, leases = {}, {1}, {}
  local expiry = now + lease
  local z, s = kl, 1
  for i = 1, n do
    local name, kind, limit, raw = ARGV[names + i], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3]
    local amount = tonumber(raw)
    a = a + 3
    if kind == 'r' or kind == 't' then
      local level = level_at(state[name], limit, window)
      if level < amount * headroom then
        local used = limit - floor(level)
        if amount > limit then return {0, i, -1, used} end
        return {0, i, ceil((amount - level) * window / limit), used}
      end
      level = level - amount
      set[#set + 1] = name
      set[#set + 1] = bucket(level)
      out[#out + 1] = floor(level)
      if limit > 0 then out[#out + 1] = ceil((limit - level) * window / limit) else out[#out + 1] = 0 end
    else
      local budget = kind == 'b'
      local zset = KEYS[z]
      z = z + 1
      local held, count, bound, recounted = current(state[name], zset, budget)
      if recounted then put(name, lease_field(held, count, bound, budget)) end  -- kept even if refused
      if bound == 0 or expiry < bound then bound = expiry end
      leases[#leases + 1] = zset
      set[#set + 1] = name
      if budget then
        local used = held + tonumber(spent[s] or '0')
        s = s + 1
        if used + amount * headroom > limit then return {0, i, -1, used} end
        leases[#leases + 1] = member .. '|' .. raw
        set[#set + 1] = lease_field(held + amount, count + 1, bound, true)
        out[#out + 1] = limit - used - amount
      else
        if count + headroom > limit then return {0, i, 1000, count} end
        leases[#leases + 1] = member
        set[#set + 1] = lease_field(0, count + 1, bound, false)
        out[#out + 1] = limit - count - 1
      end
      out[#out + 1] = 0
    end
  end
  for j = 1, #leases, 2 do call('ZADD', leases[j], expiry, leases[j + 1]) end
  for j = 1, #set, 2 do put(set[j], set[j + 1]) end
  return out
end
"""

# KEYS: the limits hash, each budget's spend (in the checks' order), then per concurrency or
# budget check its leases. ARGV: member, lease_ms, window_ms, n, headroom, budgets (how many),
# then the n checks' names (one HMGET unpacks them), then per check: kind, limit, amount.
# headroom: how many requests of these amounts must fit for this one to be admitted (1; 2 when a
# request's worth is reserved ahead, so a reservation ahead never takes a limit's last room).
# One pass: each check is judged and its new state computed; leases are added only once all pass.
ADMIT = (
    _PRELUDE
    + _STATE
    + """
local member, lease, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local headroom, budgets = tonumber(ARGV[5]), tonumber(ARGV[6])
load(7, n)
local out = admit(member, lease, window, headroom, n, 6, 6 + n, budgets, 2, 2 + budgets)
flush()
return out
"""
)

# Settlements, then the reservations ahead sent with them, against one read of their fields.
# KEYS: the limits hash, the batch's marker, then per settlement: concurrency its leases; budget
# its leases and spend; then per reservation its keys as in ADMIT (spends, then leases).
# ARGV: window_ms, n (settlements), r (reservations), names (how many), the names (the n
# settlements', then each reservation's checks'), then per settlement: kind, member, value,
# limit, amount, ttl_s; then per reservation: member, lease_ms, headroom, its number of checks,
# budgets and leases, then per check: kind, limit, amount.
# Returns {1 (0: the batch was applied before), then per reservation its verdict as ADMIT's}.
# A batch is applied at most once (its marker), however often it is sent: a reply lost to a
# timeout after Redis ran the script must not count the spend twice when retried (retries carry no
# reservations). The marker lives two minutes (a retry comes within a second or two unless Redis
# is gone; a key per batch for days would cost gigabytes at thousands of requests a second).
SETTLE = (
    _PRELUDE
    + _STATE
    + """
local window, n, r, names = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
load(5, names)
local a, k = 4 + names, 3
local applied = 0
if n == 0 or call('SET', KEYS[2], '1', 'NX', 'EX', 120) then
  applied = 1
  for i = 1, n do
    local name, kind, value = ARGV[4 + i], ARGV[a + 1], tonumber(ARGV[a + 3])
    local v = state[name]
    if kind == 't' or kind == 'r' then  -- tokens given back ('r': a reservation ahead, unused)
      if value ~= 0 and v then
        local limit = tonumber(ARGV[a + 4])
        local level = level_at(v, limit, window) + value
        if level > limit then level = limit end
        put(name, bucket(level))
      end
    elseif kind == 'c' or kind == 'b' then
      local budget = kind == 'b'
      local member = ARGV[a + 2]
      if budget then member = member .. '|' .. ARGV[a + 5] end
      if call('ZREM', KEYS[k], member) == 1 then
        local held, count, bound = leases_of(v, budget)
        count = count - 1
        if budget then held = held - tonumber(ARGV[a + 5]) end
        if count <= 0 then held, count, bound = 0, 0, 0 end
        put(name, lease_field(held, count, bound, budget))
      end
      if budget then
        local total = call('INCRBY', KEYS[k + 1], value)
        local ttl = tonumber(ARGV[a + 6])
        if ttl > 0 and total == value then call('EXPIRE', KEYS[k + 1], ttl) end
        k = k + 1
      end
      k = k + 1
    end
    a = a + 6
  end
else  -- applied before (a retry): skip its keys
  for i = 1, n do
    local kind = ARGV[a + 1]
    if kind == 'c' then k = k + 1 elseif kind == 'b' then k = k + 2 end
    a = a + 6
  end
end

-- then the reservations ahead sent with it: per reservation member, lease_ms, headroom, n,
-- budgets, leases, then its checks (names among the names above, after the settlements')
local out, at = {applied}, 4 + n
for j = 1, r do
  local member, lease, headroom = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local m, budgets, leases = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  out[j + 1] = admit(member, lease, window, headroom, m, at, a + 6, budgets, k, k + budgets)
  at, a, k = at + m, a + 6 + 3 * m, k + budgets + leases
end
flush()
return out
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
local changes = {}  -- field, value (false: delete) pairs
for i = 2, #ARGV do
  local name = ARGV[i]
  local v = redis.call('HGET', KEYS[1], name)
  if v then
    local kind = string.sub(name, 1, 1)
    if kind == 'r' or kind == 't' then
      local stamp = tonumber(string.match(v, ':(%d+)$'))
      if not stamp or now - stamp >= 2 * window then changes[#changes + 1] = name; changes[#changes + 1] = false end
    elseif kind == 'c' or kind == 'b' then
      local budget = kind == 'b'
      local held, count, bound = current(v, KEYS[i], budget)
      local after = lease_field(held, count, bound, budget)
      if after ~= v then changes[#changes + 1] = name; changes[#changes + 1] = after end
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
