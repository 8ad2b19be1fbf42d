-- Where a room's history stands (connection recovery, cluster mode): its epoch and last
-- seq. A room with no epoch (new, deleted, or lost with Redis) gets ARGV[1]: SET NX, so
-- every node agrees, and whatever history was left under the old epoch is deleted.
-- KEYS: stream, seq, epoch, bytes. ARGV: new epoch, head ttl (ms).
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[3], epoch, 'PX', ARGV[2])
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
end
return {epoch, tonumber(redis.call('GET', KEYS[2]) or '0')}
