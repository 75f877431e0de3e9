-- settle.lua: release a reservation's leases and correct the tokens buckets and budgets with the actual
-- usage. Idempotent: only the call that finds the reservation unsettled changes anything.
--
-- ARGV[2] lease member "<id>|<tokens>|<cost>"   ARGV[3] reserved tokens   ARGV[4] reserved cost
-- ARGV[5] actual tokens   ARGV[6] actual cost   ARGV[7] number of scopes
-- then 2 values per scope: tpm, budget period ('' = unlimited).
--
-- Unsettled means: the lease is still in the first scope's lease set, or it expired there and
-- admit.lua moved it to the expired set (kept at least EXPIRED_GRACE_S), so a request that outlived its
-- lease still pays for its usage, once. Returns 1 if this call settled the reservation, 0 if it was.
--
-- Optionally, in the same call, the request's permit in a backend pool comes back (fairshare.lua): after
-- the 2 values per scope, at b = 7 + 2 * nscopes:
--   ARGV[b+1] 1 if a permit is released   ARGV[b+2] the pool's key prefix   ARGV[b+3] permit member
--   ARGV[b+4] tenant   ARGV[b+5] weight   ARGV[b+6] band   ARGV[b+7] VTC cost estimated at dispatch
--   ARGV[b+8] actual VTC cost   ARGV[b+9] (unused)   ARGV[b+10] replicas key   ARGV[b+11] grant prefix
-- With no scopes (a tenant without quotas) only the permit is released; the answer is then whether it
-- was still held.

local member = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local actual_tokens = tonumber(ARGV[5])
local actual_cost = tonumber(ARGV[6])
local nscopes = tonumber(ARGV[7])

local function release_permit()
  local b = 7 + 2 * nscopes
  if ARGV[b + 1] ~= '1' then
    return 0
  end
  local p = fs_keys(ARGV[b + 2])
  local released = fs_release(p, ARGV[b + 3], ARGV[b + 4], tonumber(ARGV[b + 5]), ARGV[b + 6],
    tonumber(ARGV[b + 7]), tonumber(ARGV[b + 8]))
  if released == 1 then
    fs_purge(p)
    fs_dispatch(p, fs_state(p), ARGV[b + 10], ARGV[b + 11], '')
  end
  return released
end

if nscopes == 0 then
  return release_permit()
end

local first = redis.call('ZREM', KEYS[3], member)
if first == 0 and redis.call('ZREM', KEYS[1], member) == 0 then
  -- Settled already: by the call that also released the permit.
  return 0
end

local periods = {}
for i = 1, nscopes do
  local state, leases, budget = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local tpm, kind = tonumber(ARGV[7 + 2 * i - 1]), ARGV[7 + 2 * i]
  local removed = first
  if i > 1 then
    removed = redis.call('ZREM', leases, member)
  end
  local h = redis.call('HMGET', state, 'r', 'k', 't', 'c')
  local fields = {}
  if removed == 1 then
    local t, c = (tonumber(h[3]) or 0) - tokens, (tonumber(h[4]) or 0) - cost
    if redis.call('ZCARD', leases) == 0 then
      t, c = 0, 0
    end
    table.insert(fields, 't'); table.insert(fields, t)
    table.insert(fields, 'c'); table.insert(fields, c)
  end
  local debt = 0
  if tpm then
    -- Unused tokens come back (never above capacity: TAT not before now); tokens used beyond the
    -- reservation become debt (TAT beyond now + 60 s), which later admissions wait out.
    local k = math.max(now, tat(h[2]) + (actual_tokens - tokens) * 60 / tpm)
    if h[2] or k > now then
      table.insert(fields, 'k'); table.insert(fields, k)
      debt = k - now
    end
  end
  if #fields > 0 then
    redis.call('HSET', state, unpack(fields))
    if debt > 0 then
      expire(state, debt, h[1] or h[2] or h[3] or h[4])
    end
  end
  if kind ~= '' then
    -- Usage is charged to the period in which the request completes; the reservation, held in the
    -- lease's weights, was released above.
    local p = periods[kind]
    if p == nil then
      p = {period(kind, now)}
      periods[kind] = p
    end
    local b = redis.call('HMGET', budget, 'p', 's')
    local spent = (b[1] == p[1]) and tonumber(b[2]) or 0
    redis.call('HSET', budget, 'p', p[1], 's', spent + actual_cost)
    expire(budget, p[2] - now, false)
  end
end
release_permit()
return 1
