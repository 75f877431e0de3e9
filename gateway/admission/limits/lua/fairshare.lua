-- fairshare.lua: one weighted fair queue per backend pool, shared by every replica (functions only; the
-- scripts that use them are admit.lua, settle.lua, acquire.lua, cancel.lua, renew.lua and capacity.lua).
--
-- A pool is a backend: one or more engine endpoints. Its keys share the prefix `P` given by the caller
-- (`gw:pool:{<backend>}:`):
--   P..'permits'  zset  "<waiter id>|<endpoint>" scored by lease expiry: the requests at the pool's engines
--   P..'load'     hash  endpoint -> permits held there
--   P..'limits'   hash  endpoint -> how many requests that engine may have at once (the capacity control
--                       writes it from the engine's own load; its fields are the pool's endpoints)
--   P..'vtc'      hash  tenant -> weighted virtual token counter (VTC, Sheng et al., OSDI 2024)
--   P..'last'     hash  priority band -> the counter of the tenant dispatched last in that band
--   P..'bands'    zset  priority bands that have waiting requests (score = band)
--   P..'bl:'..b   zset  tenant -> counter, for the tenants with waiting requests in band b
--   P..'q:'..t    list  tenant t's waiting requests, oldest first
--   P..'aff'      hash  affinity key -> the endpoint it is assigned to
--   P..'affz'     zset  affinity key -> when it expires (its last request + the affinity TTL)
--   P..'affn'     hash  endpoint -> affinity keys assigned to it
-- and two keys shared by all pools: the live replicas (zset replica -> heartbeat expiry) and, per replica,
-- a list its grant listener pops: "<waiter id>|<endpoint>" for each waiting request granted a permit.
--
-- A waiting request is one string, kept as is by its replica (to cancel it):
--   "<waiter id>|<replica>|<tenant>|<weight>|<band>|<cost>|<lease ttl>|<load factor>|<endpoints>"
-- where cost is the VTC charge estimated at dispatch (input + 2 x output tokens, before the weight) and
-- endpoints (comma separated) are those that may serve it, in its order of preference, led by
-- "#<affinity key>@<affinity TTL>" when the request has a prefix to keep together (see fs_choose).
--
-- Fairness: a free permit goes to the highest band with waiters, then to the tenant with the lowest
-- counter in it; its counter grows by cost / weight at dispatch and is corrected by the actual usage at
-- release. A tenant that starts waiting is lifted to the lowest counter among those already waiting in
-- its band (or to the counter of the band's last dispatched tenant when nobody waits), so idle time earns
-- no credit. Work-conserving: a request waits only if no permit is free.

local function fs_keys(prefix)
  return {
    permits = prefix .. 'permits', load = prefix .. 'load', limits = prefix .. 'limits',
    vtc = prefix .. 'vtc', last = prefix .. 'last', bands = prefix .. 'bands',
    bl = prefix .. 'bl:', q = prefix .. 'q:',
    aff = prefix .. 'aff', affz = prefix .. 'affz', affn = prefix .. 'affn',
  }
end

-- How long a pool's loads and counters outlive the last capacity update (a pool nobody serves any more).
local FS_STATE_TTL_S = 86400
-- At most this many expired affinity keys are dropped per call, so a call's cost stays bounded; a pool
-- that sees requests drops them faster than they expire.
local FS_AFF_TRIM = 16

-- Take a key off its endpoint's count (a count that reaches zero leaves the hash).
local function fs_uncount(p, ep)
  if redis.call('HINCRBY', p.affn, ep, -1) <= 0 then
    redis.call('HDEL', p.affn, ep)
  end
end

-- Affinity keys nobody asked for during their TTL give their place back (the oldest first, a few a call).
local function fs_forget(p)
  local stale = redis.call('ZRANGEBYSCORE', p.affz, '-inf', now, 'LIMIT', 0, FS_AFF_TRIM)
  if #stale == 0 then
    return
  end
  for _, key in ipairs(stale) do
    local ep = redis.call('HGET', p.aff, key)
    if ep then
      fs_uncount(p, ep)
    end
  end
  redis.call('HDEL', p.aff, unpack(stale))
  redis.call('ZREM', p.affz, unpack(stale))
end

-- Permits of crashed or stalled holders come back here: each carries its endpoint, whose load drops.
local function fs_purge(p)
  fs_forget(p)
  local expired = redis.call('ZRANGEBYSCORE', p.permits, '-inf', now)
  if #expired == 0 then
    return
  end
  for _, member in ipairs(expired) do
    local ep = string.match(member, '|([^|]*)$')
    if ep and redis.call('HINCRBY', p.load, ep, -1) < 0 then
      redis.call('HSET', p.load, ep, 0)
    end
  end
  redis.call('ZREMRANGEBYSCORE', p.permits, '-inf', now)
end


-- The pool as it stands: its endpoints with their limit and load, and the totals.
local function fs_state(p)
  local st = {eps = {}, order = {}, n = 0, limit = 0, load = 0}
  local limits = redis.call('HGETALL', p.limits)
  for i = 1, #limits, 2 do
    local ep, lim = limits[i], tonumber(limits[i + 1])
    st.eps[ep] = {limit = lim, load = 0}
    st.order[#st.order + 1] = ep
    st.n = st.n + 1
    st.limit = st.limit + lim
  end
  local load = redis.call('HGETALL', p.load)
  for i = 1, #load, 2 do
    local e = st.eps[load[i]]
    local n = tonumber(load[i + 1])
    if e then
      e.load = n
    end
    -- Requests at an endpoint that left the pool still occupy what they hold until they finish.
    st.load = st.load + n
  end
  return st
end

local function fs_free(st)
  return st.limit - st.load
end

-- The endpoint of `ranking` with the most room relative to its limit.
local function fs_least(st, ranking)
  local best, best_share = nil, nil
  for ep in string.gmatch(ranking, '[^,]+') do
    local e = st.eps[ep]
    if e and e.load < e.limit then
      local share = e.load / e.limit
      if best == nil or share < best_share then
        best, best_share = ep, share
      end
    end
  end
  return best
end

-- Where a granted request goes, among the endpoints that may serve it (`ranking`, in its order of
-- preference). With a load factor, an endpoint is within bounds while its load stays under its limit and
-- within `factor` times the pool's mean (bounded load, Mirrokni, Thorup and Zadimoghaddam 2018).
--
-- A request with an affinity key (its prefix within its cache scope) goes where that key is assigned, if
-- that endpoint is within bounds. A key not assigned yet (or whose endpoint left the pool) is assigned to
-- the first endpoint of its ranking that holds fewer than an even share of the pool's keys,
-- ceil((keys + 1) / endpoints), preferring one within bounds: keys spread evenly, as consistent hashing
-- with bounded loads does, but counted in keys (prefixes to cache) rather than in requests, and they stay
-- where they are. A request whose key's endpoint is beyond bounds spills alone, as a request without a key
-- goes: to the first endpoint of its ranking within bounds; the key stays where it is.
--
-- Failing all that, or with factor 0 (no affinity), the endpoint with the most room relative to its limit.
-- Returns the endpoint and what to record of the key once the request is granted (fs_remember), or nil.
local function fs_choose(p, st, ranking, factor)
  local key, key_ttl, rest = string.match(ranking, '^#([^@]*)@([^,]*),?(.*)$')
  if key then
    ranking = rest
  end
  if factor > 0 and st.n > 0 then
    local bound = math.ceil(factor * (st.load + 1) / st.n)
    local function fits(ep)
      local e = st.eps[ep]
      return e ~= nil and e.load < e.limit and e.load + 1 <= bound
    end
    local note = nil
    if key then
      note = {key = key, ttl = tonumber(key_ttl)}
      local held = redis.call('HGET', p.aff, key)
      local e = held and st.eps[held]
      if e and e.limit > 0 then
        note.ep = held
        if fits(held) and string.find(',' .. ranking .. ',', ',' .. held .. ',', 1, true) then
          return held, note
        end
      else
        note.old = held or nil
        local counts, keys, alive = {}, 0, 0
        local flat = redis.call('HGETALL', p.affn)
        for i = 1, #flat, 2 do
          counts[flat[i]] = tonumber(flat[i + 1])
        end
        for _, ep in ipairs(st.order) do
          if st.eps[ep].limit > 0 then
            alive = alive + 1
            keys = keys + (counts[ep] or 0)
          end
        end
        local share = math.ceil((keys + 1) / math.max(alive, 1))
        for ep in string.gmatch(ranking, '[^,]+') do
          local c = st.eps[ep]
          if c and c.limit > 0 and (counts[ep] or 0) < share then
            if fits(ep) then
              note.ep, note.assign = ep, true
              return ep, note
            elseif note.ep == nil then
              note.ep, note.assign = ep, true
            end
          end
        end
      end
    end
    for ep in string.gmatch(ranking, '[^,]+') do
      if fits(ep) then
        return ep, note
      end
    end
    local best = fs_least(st, ranking)
    return best, best and note
  end
  return fs_least(st, ranking), nil
end

-- A granted request's key: assigned where fs_choose put it (leaving the endpoint it had, if any) and, in
-- any case, kept for another TTL. All three keys of the table expire together, after the newest entry.
local function fs_remember(p, note)
  if note == nil or note.ep == nil then
    return
  end
  if note.assign then
    redis.call('HSET', p.aff, note.key, note.ep)
    redis.call('HINCRBY', p.affn, note.ep, 1)
    if note.old then
      fs_uncount(p, note.old)
    end
  end
  redis.call('ZADD', p.affz, now + note.ttl, note.key)
  for _, k in ipairs({p.aff, p.affz, p.affn}) do
    expire(k, note.ttl, false)
  end
end

local function fs_counter(p, tenant)
  return tonumber(redis.call('HGET', p.vtc, tenant)) or 0
end

-- The lift floor of `tenant` in `band`: the lowest counter among the other tenants waiting there, or the
-- counter of the tenant dispatched there last.
local function fs_floor(p, band, tenant)
  local head = redis.call('ZRANGE', p.bl .. band, 0, 1, 'WITHSCORES')
  for i = 1, #head, 2 do
    if head[i] ~= tenant then
      return tonumber(head[i + 1])
    end
  end
  return tonumber(redis.call('HGET', p.last, band))
end

local function fs_lift(p, tenant, band)
  local counter = fs_counter(p, tenant)
  local floor = fs_floor(p, band, tenant)
  if floor and floor > counter then
    redis.call('HSET', p.vtc, tenant, floor)
    return floor
  end
  return counter
end

-- A permit granted to a waiting request through its replica's list is held for this long only, until that
-- replica picks the grant up and renews it for the full lease. A replica that died with requests waiting
-- keeps counting as alive until its beat expires, and its requests, whose tenant is served no more, have
-- the lowest counters: without this, each free permit would go to one of them and stay lost for a lease.
local FS_CLAIM_S = 2

-- Give a permit at `ep` to a request of `tenant`, leased for `lease` seconds (`ttl` if nil); returns the
-- tenant's new counter.
local function fs_grant(p, st, wid, ep, tenant, weight, band, cost, ttl, lease)
  redis.call('ZADD', p.permits, now + (lease or ttl), wid .. '|' .. ep)
  -- Every permit of a pool has the same TTL, so the newest one ends last.
  expire(p.permits, ttl, false)
  redis.call('HINCRBY', p.load, ep, 1)
  st.eps[ep].load = st.eps[ep].load + 1
  st.load = st.load + 1
  local counter = tonumber(redis.call('HINCRBYFLOAT', p.vtc, tenant, cost / weight))
  redis.call('HSET', p.last, band, counter)
  -- The loads, counters and last-dispatched hashes get their TTL from capacity.lua, every interval.
  return counter
end

local function fs_waiting(p)
  return redis.call('ZCARD', p.bands) > 0
end

local function fs_enqueue(p, entry, tenant, band)
  local q = p.q .. tenant
  if redis.call('LLEN', q) == 0 then
    local counter = fs_lift(p, tenant, band)
    redis.call('ZADD', p.bl .. band, counter, tenant)
    redis.call('ZADD', p.bands, band, band)
  end
  redis.call('RPUSH', q, entry)
  expire(q, FS_STATE_TTL_S, false)
end

-- Drop `tenant` from its band's backlog once its queue is empty, and the band once nobody waits in it.
local function fs_unqueued(p, tenant, band)
  if redis.call('LLEN', p.q .. tenant) == 0 then
    redis.call('ZREM', p.bl .. band, tenant)
    if redis.call('ZCARD', p.bl .. band) == 0 then
      redis.call('ZREM', p.bands, band)
    end
  end
end

local function fs_parse(entry)
  local wid, replica, tenant, weight, band, cost, ttl, factor, ranking =
    string.match(entry, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {
    wid = wid, replica = replica, tenant = tenant, weight = tonumber(weight), band = band,
    cost = tonumber(cost), ttl = tonumber(ttl), factor = tonumber(factor), ranking = ranking,
  }
end

-- Grant free permits to waiting requests, fairly, until none is free or nobody waits. A request of a
-- replica that stopped beating is dropped. Grants go to their replica's list, except the one of waiter
-- `self_wid` (the caller's own request), whose endpoint is returned.
local function fs_dispatch(p, st, replicas, grants, self_wid)
  local mine = nil
  while fs_free(st) > 0 do
    local top = redis.call('ZREVRANGE', p.bands, 0, 0)
    local band = top[1]
    if band == nil then
      break
    end
    local head = redis.call('ZRANGE', p.bl .. band, 0, 0)
    local tenant = head[1]
    if tenant == nil then
      redis.call('ZREM', p.bands, band)
    else
      local entry = redis.call('LPOP', p.q .. tenant)
      if entry == false or entry == nil then
        fs_unqueued(p, tenant, band)
      else
        local w = fs_parse(entry)
        local alive = tonumber(redis.call('ZSCORE', replicas, w.replica))
        if alive == nil or alive < now then
          fs_unqueued(p, tenant, band)
        else
          local ep, note = fs_choose(p, st, w.ranking, w.factor)
          if ep == nil then
            -- Room in total but none at an endpoint (limits moved under requests in flight): wait on.
            redis.call('LPUSH', p.q .. tenant, entry)
            break
          end
          local lease = nil
          if w.wid ~= self_wid then
            lease = math.min(w.ttl, FS_CLAIM_S)
          end
          local counter = fs_grant(p, st, w.wid, ep, tenant, w.weight, band, w.cost, w.ttl, lease)
          fs_remember(p, note)
          if redis.call('LLEN', p.q .. tenant) > 0 then
            redis.call('ZADD', p.bl .. band, counter, tenant)
          else
            fs_unqueued(p, tenant, band)
          end
          if w.wid == self_wid then
            mine = ep
          else
            local list = grants .. w.replica
            redis.call('RPUSH', list, w.wid .. '|' .. ep)
            redis.call('EXPIRE', list, 60)
          end
        end
      end
    end
  end
  return mine
end

-- A request finished (or moved): its permit comes back, its tenant's counter is corrected from the
-- estimate to the actual cost, and waiting requests take what is free. Returns 1 if the permit was held.
local function fs_release(p, member, tenant, weight, band, estimate, actual)
  local removed = redis.call('ZREM', p.permits, member)
  if removed == 1 then
    local ep = string.match(member, '|([^|]*)$')
    if redis.call('HINCRBY', p.load, ep, -1) < 0 then
      redis.call('HSET', p.load, ep, 0)
    end
    if actual ~= estimate then
      local counter = tonumber(redis.call('HINCRBYFLOAT', p.vtc, tenant, (actual - estimate) / weight))
      -- A tenant still waiting is ranked by its corrected counter.
      redis.call('ZADD', p.bl .. band, 'XX', counter, tenant)
    end
  end
  return removed
end
