-- lead.lua: who runs a pool's capacity control. The first replica to ask takes the lead for `ttl` ms and
-- keeps it by asking again before it runs out; when it stops asking (it died), another takes over.
--
-- KEYS[1] the pool's lead key   ARGV[2] replica   ARGV[3] ttl in milliseconds
-- Returns 1 if this replica leads.

local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
  return 1
end
return 0
