-- common.lua: helpers shared by admit.lua, settle.lua and renew.lua. The store loads each script as
-- common.lua followed by the script's own file, so every script stays one self-contained EVALSHA.
--
-- Calling convention shared by all three scripts:
--   KEYS[1]                  gw:{tenant}:expired   zset of leases that expired unsettled (see settle.lua)
--   KEYS[3i-1], [3i], [3i+1] for scope i (1-based): the scope's state hash, lease zset and budget hash
--   ARGV[1]                  '' to use the server clock (production), or a time in seconds (tests only)
-- Every key carries the tenant's {hash tag}. Redis is a standalone primary all the same: admit.lua and
-- settle.lua also touch a pool's fair-queue keys (fairshare.lua), which live in another slot.

-- A request may be admitted up to 1 microsecond early: `now` is a double near 1.8e9, whose rounding
-- (~2.4e-7 s) must not turn "exactly at now + retry_after" into a refusal.
local SLACK_S = 0.000001
-- Budget comparisons tolerate this much float drift in summed costs.
local COST_EPS = 0.000000001
-- Retry hint when in-flight leases block: slots normally free when requests finish, which the script
-- cannot predict; the earliest lease expiry is a hard upper bound and is used when it is sooner.
local LEASE_HINT_S = 1.0
-- How long a lease that expired unsettled is remembered, so a late settle still charges its usage once.
local EXPIRED_GRACE_S = 3600
-- Added to every TTL so a key never expires a moment before the state it holds would be trivial.
local TTL_MARGIN_S = 1

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  -- Server time: replicas' clocks do not matter. Scripts are replicated by effects, so TIME is allowed.
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Durations leave the scripts as whole microseconds, rounded up (so waiting that long is enough):
-- integer replies need no float formatting, which is a large part of a script's cost.
local function us(seconds)
  if seconds <= 0 then
    return 0
  end
  return math.ceil(seconds * 1000000)
end

-- Set the TTL of `key` to `seconds` (+ margin). Where the key existed before this call, only lengthen
-- it (GT): other state in the key may need longer than this call knows. A key just created has no TTL,
-- which GT would treat as infinite, so it gets a plain PEXPIRE.
local function expire(key, seconds, existed)
  local ms = math.ceil((seconds + TTL_MARGIN_S) * 1000)
  if existed then
    redis.call('PEXPIRE', key, ms, 'GT')
  else
    redis.call('PEXPIRE', key, ms)
  end
end

-- Buckets are GCRA-style: the state is one number, the time at which the bucket is full again ("TAT").
-- A missing or past TAT means full; the level at `now` is cap - (TAT - now) * rate, negative in debt.
-- One stored float per bucket instead of a level and a timestamp.
local function tat(stored)
  local t = tonumber(stored)
  if t == nil or t < now then
    return now
  end
  return t
end

-- A lease member is "<reservation id>|<tokens>|<cost>": the lease carries its own weights, so purging
-- an expired lease can subtract them from the scope's in-flight sums without another key.
local function weights(member)
  local tokens, cost = string.match(member, '|(%d+)|([^|]*)$')
  return tonumber(tokens), tonumber(cost)
end

-- Proleptic Gregorian calendar arithmetic on days since 1970-01-01 (H. Hinnant's algorithms).
local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then
    y = y + 1
  end
  return y, m, d
end

-- The UTC budget period containing `t` ('2026-11-23', '2026-W48' (ISO week), '2026-11') and the epoch
-- second at which it ends. Must agree with gateway/admission/limits/_period.py.
local function period(kind, t)
  local days = math.floor(t / 86400)
  if kind == 'day' then
    local y, m, d = civil_from_days(days)
    return string.format('%04d-%02d-%02d', y, m, d), (days + 1) * 86400
  elseif kind == 'week' then
    local wd = (days + 3) % 7 -- 0 = Monday; 1970-01-01 was a Thursday
    local thursday = days - wd + 3 -- an ISO week belongs to the year of its Thursday
    local y = civil_from_days(thursday)
    local week = math.floor((thursday - days_from_civil(y, 1, 1)) / 7) + 1
    return string.format('%04d-W%02d', y, week), (days - wd + 7) * 86400
  end
  local y, m = civil_from_days(days)
  if m == 12 then
    return string.format('%04d-%02d', y, m), days_from_civil(y + 1, 1, 1) * 86400
  end
  return string.format('%04d-%02d', y, m), days_from_civil(y, m + 1, 1) * 86400
end
