-- cancel.lua: take a waiting request out of its pool's fair queue (its client left, or it waited too long).
--
-- ARGV[2] the pool's key prefix   ARGV[3] tenant   ARGV[4] band   ARGV[5] the request's queue entry
-- Returns 1 if it was still waiting (it is gone now), 0 if it was granted a permit meanwhile (the grant is
-- on its way to the replica, which gives the permit back) or dropped.

local p = fs_keys(ARGV[2])
local removed = redis.call('LREM', p.q .. ARGV[3], 1, ARGV[5])
if removed == 1 then
  fs_unqueued(p, ARGV[3], ARGV[4])
end
return removed
