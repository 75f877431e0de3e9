-- renew.lua: push a live reservation's lease expiry to now + TTL in every scope that holds it, and its
-- permit's in its backend pool.
--
-- ARGV[2] lease member   ARGV[3] lease TTL in seconds   ARGV[4] number of scopes
-- then ARGV[5] the pool's key prefix ('' if no permit) and ARGV[6] the permit member.
-- Returns 1 if the lease (or, without scopes, the permit) was renewed, 0 if it was already settled or
-- expired and purged (its slots were given back; the request may finish, and its settle still charges
-- the usage).

local member = ARGV[2]
local ttl = tonumber(ARGV[3])
local nscopes = tonumber(ARGV[4])
local prefix, permit = ARGV[5] or '', ARGV[6]

local renewed = 1
if prefix ~= '' then
  local p = fs_keys(prefix)
  renewed = redis.call('ZADD', p.permits, 'XX', 'CH', now + ttl, permit)
  if renewed == 1 then
    expire(p.permits, ttl, true)
  end
end
if nscopes == 0 then
  return renewed
end
if not redis.call('ZSCORE', KEYS[3], member) then
  return 0
end
for i = 1, nscopes do
  local state, leases = KEYS[3 * i - 1], KEYS[3 * i]
  if redis.call('ZADD', leases, 'XX', 'CH', now + ttl, member) == 1 then
    -- Both keys exist (they hold this lease), so GT only ever lengthens their TTLs.
    expire(leases, ttl, true)
    expire(state, ttl, true)
  end
end
return 1
