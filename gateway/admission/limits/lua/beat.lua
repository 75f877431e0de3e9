-- beat.lua: this replica is alive for another `ttl` seconds (its waiting requests stay in the fair queues);
-- replicas silent for long are forgotten.
--
-- KEYS[1] the replicas zset   ARGV[2] replica   ARGV[3] ttl in seconds
-- Returns 1 if the replica was already known and alive, 0 if it (re)joins: a replica whose beat had lapsed
-- may have had its waiting requests dropped.

local alive = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[2]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600)
redis.call('EXPIRE', KEYS[1], 7200)
if alive and alive >= now then
  return 1
end
return 0
