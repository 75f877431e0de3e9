-- admit.lua: check every limit of every scope and, only if all pass, reserve them all (all-or-nothing).
--
-- ARGV[2] lease member "<id>|<tokens>|<cost>"   ARGV[3] tokens   ARGV[4] worst-case cost
-- ARGV[5] lease TTL in seconds                  ARGV[6] number of scopes
-- then 6 values per scope: rpm, tpm, max_concurrency, max_inflight_tokens, budget amount, budget period
-- ('' = unlimited).
--
-- Per scope: state hash  r, k  TAT of the requests and tokens buckets (see `tat` in common.lua)
--                        t, c  tokens and worst-case cost of the leases in flight
--            lease zset  member "<id>|<tokens>|<cost>", score = expiry (s); purged here when expired
--            budget hash p = period id, s = spent in that period (written by settle.lua only)
-- The first scope always takes a lease, even without in-flight limits: it marks the reservation as
-- unsettled, which is what makes settle.lua idempotent.
--
-- Then, optionally, a place in a backend pool's fair queue (fairshare.lua), decided in the same call:
-- after the 6 values per scope, at b = 6 + 6 * nscopes:
--   ARGV[b+1] number of pools offered (0: quotas only)   ARGV[b+2] waiter id   ARGV[b+3] replica
--   ARGV[b+4] tenant   ARGV[b+5] weight   ARGV[b+6] priority band   ARGV[b+7] VTC cost estimate
--   ARGV[b+8] permit lease TTL   ARGV[b+9] tenant's max queue depth ('' = unbounded)
--   ARGV[b+10] 1 to spill to a later pool with a free permit rather than wait   ARGV[b+11] load factor
--   ARGV[b+12] replicas key   ARGV[b+13] grant lists' key prefix
--   then per pool: its key prefix and the endpoints that may serve the request there, in its order of
--   preference (comma separated, led by "#<affinity key>@<affinity TTL>" when the request has one, see
--   fs_choose); a load factor of 0 means no preference (the least loaded serves).
-- The request takes a free permit of the first pool (or, spilling, of a later one) when nobody waits
-- there; otherwise it waits in the first pool's queue, unless the tenant's queue is full, which refuses
-- the whole admission ('queue_full') and reserves nothing. With no scopes (a tenant without quotas) only
-- the fair queue is consulted.
--
-- Returns {allowed, limit, scope index, retry_after_us, exceeds,
--          requests limit, remaining, reset_us, tokens limit, remaining, reset_us,
--          place ('' | 'granted' | 'queued' | 'full'), pool index, endpoint, requests ahead in the tenant's
--          queue, tenants waiting in its band}  ('' where unlimited).

local member = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local nscopes = tonumber(ARGV[6])
local tombs = KEYS[1]

local periods = {} -- kind -> {id, end}: scopes usually share a period kind
local scopes = {}
for i = 1, nscopes do
  local a = 6 + (i - 1) * 6
  local s = {
    state = KEYS[3 * i - 1], leases = KEYS[3 * i], budget = KEYS[3 * i + 1],
    rpm = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]),
    conc = tonumber(ARGV[a + 3]), inflight = tonumber(ARGV[a + 4]),
    amount = tonumber(ARGV[a + 5]), kind = ARGV[a + 6],
  }
  local h = redis.call('HMGET', s.state, 'r', 'k', 't', 'c')
  s.existed = h[1] or h[2] or h[3] or h[4]
  s.r, s.k = tat(h[1]), tat(h[2])
  s.t, s.c = tonumber(h[3]) or 0, tonumber(h[4]) or 0

  -- Leases of crashed or stalled holders give their slots back here.
  local expired = redis.call('ZRANGEBYSCORE', s.leases, '-inf', now)
  if #expired > 0 then
    if i == 1 then
      redis.call('ZREMRANGEBYSCORE', tombs, '-inf', now) -- forget those past their grace
    end
    for _, m in ipairs(expired) do
      local mt, mc = weights(m)
      s.t, s.c = s.t - mt, s.c - mc
      if i == 1 then
        redis.call('ZADD', tombs, now + EXPIRED_GRACE_S, m)
      end
    end
    if i == 1 then
      expire(tombs, EXPIRED_GRACE_S, false)
    end
    redis.call('ZREMRANGEBYSCORE', s.leases, '-inf', now)
    s.dirty = true
  end
  s.n = redis.call('ZCARD', s.leases)
  if s.n == 0 then
    s.t, s.c = 0, 0 -- no float drift survives an empty set
  end

  if s.amount then
    local p = periods[s.kind]
    if p == nil then
      p = {period(s.kind, now)}
      periods[s.kind] = p
    end
    local b = redis.call('HMGET', s.budget, 'p', 's')
    s.spent = (b[1] == p[1]) and tonumber(b[2]) or 0
    s.period_end = p[2]
  end
  scopes[i] = s
end

-- How long until in-flight leases stop blocking: a small hint, or the earliest expiry if sooner.
local function lease_wait(s)
  local first = redis.call('ZRANGE', s.leases, 0, 0, 'WITHSCORES')
  if first[2] then
    return math.min(LEASE_HINT_S, tonumber(first[2]) - now)
  end
  return LEASE_HINT_S
end

-- The reported limit is the first failure in check order (budget, rpm, tpm, concurrency,
-- inflight_tokens; scopes in the caller's order), except that one the request can never pass wins.
-- retry_after is the longest wait among all failures, so a retry then is not refused by another.
local reason, where, exceeds, retry = nil, 0, false, 0
local function fail(limit, i, wait, never)
  if never then
    if not exceeds then
      reason, where, exceeds = limit, i, true
    end
  elseif reason == nil then
    reason, where = limit, i
  end
  if wait > retry then
    retry = wait
  end
end

for i, s in ipairs(scopes) do
  if s.amount then
    if cost > s.amount + COST_EPS then
      fail('budget', i, 0, true)
    elseif s.spent + cost > s.amount + COST_EPS then
      fail('budget', i, s.period_end - now, false)
    elseif s.spent + s.c + cost > s.amount + COST_EPS then
      fail('budget', i, lease_wait(s), false)
    end
  end
end
for i, s in ipairs(scopes) do
  if s.rpm then
    -- Wait until one request's worth has refilled: until TAT - now <= (cap - 1) / rate.
    local wait = (s.r - now) - (s.rpm - 1) * 60 / s.rpm
    if wait > SLACK_S then
      fail('rpm', i, wait, false)
    end
  end
end
for i, s in ipairs(scopes) do
  if s.tpm then
    local wait = (s.k - now) - (s.tpm - tokens) * 60 / s.tpm
    if tokens > s.tpm then
      fail('tpm', i, 0, true)
    elseif wait > SLACK_S then
      fail('tpm', i, wait, false)
    end
  end
end
for i, s in ipairs(scopes) do
  if s.conc and s.n >= s.conc then
    fail('concurrency', i, lease_wait(s), false)
  end
end
for i, s in ipairs(scopes) do
  if s.inflight then
    if tokens > s.inflight then
      fail('inflight_tokens', i, 0, true)
    elseif s.t + tokens > s.inflight then
      fail('inflight_tokens', i, lease_wait(s), false)
    end
  end
end

-- The fair queue's decision, before anything is written: a full queue refuses the whole admission.
local fs_base = 6 + 6 * nscopes
local npools = tonumber(ARGV[fs_base + 1]) or 0
local place, place_pool, place_ep, place_ahead, place_backlog = '', 0, '', 0, 0
local fs = nil
if reason == nil and npools > 0 then
  fs = {
    wid = ARGV[fs_base + 2], replica = ARGV[fs_base + 3], tenant = ARGV[fs_base + 4],
    weight = tonumber(ARGV[fs_base + 5]), band = ARGV[fs_base + 6], cost = tonumber(ARGV[fs_base + 7]),
    ttl = tonumber(ARGV[fs_base + 8]), depth = tonumber(ARGV[fs_base + 9]), spill = ARGV[fs_base + 10] == '1',
    factor = tonumber(ARGV[fs_base + 11]), replicas = ARGV[fs_base + 12], grants = ARGV[fs_base + 13],
    pools = {},
  }
  for i = 1, npools do
    local pool = {p = fs_keys(ARGV[fs_base + 12 + 2 * i]), ranking = ARGV[fs_base + 13 + 2 * i]}
    fs_purge(pool.p)
    pool.st = fs_state(pool.p)
    fs.pools[i] = pool
  end
  -- A free permit goes to a newcomer only where nobody waits for one: waiters are served fairly first.
  for i, pool in ipairs(fs.pools) do
    if i > 1 and not fs.spill then
      break
    end
    if not fs_waiting(pool.p) and fs_free(pool.st) > 0 then
      local ep, note = fs_choose(pool.p, pool.st, pool.ranking, fs.factor)
      if ep then
        fs.choice, fs.ep, fs.note = i, ep, note
        break
      end
    end
  end
  if fs.choice == nil then
    local first = fs.pools[1]
    local depth = redis.call('LLEN', first.p.q .. fs.tenant)
    if fs.depth and depth >= fs.depth then
      reason, where = 'queue_full', 0
      place, place_pool, place_ahead = 'full', 1, depth
      place_backlog = redis.call('ZCARD', first.p.bl .. fs.band)
    end
  end
end

local allowed = reason == nil
for i, s in ipairs(scopes) do
  local fields = {}
  local need = 0
  if allowed then
    if s.rpm then
      s.r = s.r + 60 / s.rpm
      table.insert(fields, 'r'); table.insert(fields, s.r)
      need = s.r - now
    end
    if s.tpm then
      s.k = s.k + tokens * 60 / s.tpm
      table.insert(fields, 'k'); table.insert(fields, s.k)
      need = math.max(need, s.k - now)
    end
    if i == 1 or s.conc or s.inflight or s.amount then
      redis.call('ZADD', s.leases, now + ttl, member)
      -- The newest lease usually ends last; GT keeps a longer TTL that a renewed lease needs.
      expire(s.leases, ttl, s.n > 0)
      s.n, s.t, s.c, s.dirty = s.n + 1, s.t + tokens, s.c + cost, true
      need = math.max(need, ttl)
    end
  end
  if s.dirty then
    table.insert(fields, 't'); table.insert(fields, s.t)
    table.insert(fields, 'c'); table.insert(fields, s.c)
  end
  if #fields > 0 then
    redis.call('HSET', s.state, unpack(fields))
    -- Idle keys expire: the state lives until both buckets are full and its last lease has ended.
    if allowed then
      expire(s.state, need, s.existed)
    end
  end
end

if allowed and fs then
  if fs.choice then
    local pool = fs.pools[fs.choice]
    fs_grant(pool.p, pool.st, fs.wid, fs.ep, fs.tenant, fs.weight, fs.band, fs.cost, fs.ttl)
    fs_remember(pool.p, fs.note)
    place, place_pool, place_ep = 'granted', fs.choice, fs.ep
  else
    local first = fs.pools[1]
    local entry = table.concat(
      {fs.wid, fs.replica, fs.tenant, ARGV[fs_base + 5], fs.band, ARGV[fs_base + 7], ARGV[fs_base + 8],
       ARGV[fs_base + 11], first.ranking}, '|')
    fs_enqueue(first.p, entry, fs.tenant, fs.band)
    local mine = fs_dispatch(first.p, first.st, fs.replicas, fs.grants, fs.wid)
    if mine then
      place, place_pool, place_ep = 'granted', 1, mine
    else
      place, place_pool = 'queued', 1
      place_ahead = redis.call('LLEN', first.p.q .. fs.tenant) - 1
      place_backlog = redis.call('ZCARD', first.p.bl .. fs.band)
    end
  end
end

-- Rate headers: per dimension, the most constraining scope (fewest whole units remaining).
local function level(t, cap)
  -- With the admission slack, so a level that is a whole number is not floored one below it.
  return cap - (t - now - SLACK_S) * cap / 60
end
local hr, hk
for i, s in ipairs(scopes) do
  if s.rpm and (hr == nil or math.floor(level(s.r, s.rpm)) < math.floor(level(scopes[hr].r, scopes[hr].rpm))) then
    hr = i
  end
  if s.tpm and (hk == nil or math.floor(level(s.k, s.tpm)) < math.floor(level(scopes[hk].k, scopes[hk].tpm))) then
    hk = i
  end
end
local out = {allowed and 1 or 0, reason or '', where, exceeds and 0 or us(retry), exceeds and 1 or 0,
             '', '', '', '', '', ''}
if hr then
  local s = scopes[hr]
  out[6], out[7], out[8] = s.rpm, math.max(0, math.floor(level(s.r, s.rpm))), us(s.r - now)
end
if hk then
  local s = scopes[hk]
  out[9], out[10], out[11] = s.tpm, math.max(0, math.floor(level(s.k, s.tpm))), us(s.k - now)
end
out[12], out[13], out[14], out[15], out[16] = place, place_pool, place_ep, place_ahead, place_backlog
return out
