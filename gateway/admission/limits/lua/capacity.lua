-- capacity.lua: set a pool's endpoints and how many requests each may have at once (the capacity control
-- does, from the engines' own load), then grant what the new limits free to waiting requests; or, for a
-- replica that does not run the pool's control, only read the pool's state.
--
-- ARGV[2] the pool's key prefix   ARGV[3] '1' to write the limits, '0' only to read the pool's state
-- ARGV[4] replicas key   ARGV[5] grant lists' prefix   ARGV[6] TTL of the limits (s)
-- then pairs: endpoint, limit (an endpoint left out leaves the pool; its requests in flight finish).
-- Returns {total limit, permits held, tenants waiting, then pairs: endpoint, permits held there}.

local p = fs_keys(ARGV[2])
local write = ARGV[3] == '1'
if write then
  redis.call('DEL', p.limits)
  local pairs_ = {}
  for i = 7, #ARGV, 2 do
    pairs_[#pairs_ + 1] = ARGV[i]
    pairs_[#pairs_ + 1] = ARGV[i + 1]
  end
  if #pairs_ > 0 then
    redis.call('HSET', p.limits, unpack(pairs_))
    expire(p.limits, tonumber(ARGV[6]), false)
  end
  for _, key in ipairs({p.load, p.vtc, p.last}) do
    expire(key, FS_STATE_TTL_S, false)
  end
  fs_purge(p)
end
local st = fs_state(p)
if write then
  fs_dispatch(p, st, ARGV[4], ARGV[5], '')
end
local waiting = 0
for _, band in ipairs(redis.call('ZRANGE', p.bands, 0, -1)) do
  waiting = waiting + redis.call('ZCARD', p.bl .. band)
end
local out = {st.limit, st.load, waiting}
for _, ep in ipairs(st.order) do
  out[#out + 1] = ep
  out[#out + 1] = st.eps[ep].load
end
return out
