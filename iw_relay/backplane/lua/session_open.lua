-- A fresh member's session (connection recovery, cluster mode), and where the room's
-- stream stands: its epoch (made by the first node to ask, so every node agrees; a room
-- whose epoch was lost gets a new one and its old history is deleted) and its last seq.
-- KEYS: stream, seq, epoch, bytes, session.
-- ARGV: new epoch, head ttl (ms), node. Returns {epoch, seq}.
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
end
redis.call('PEXPIRE', KEYS[3], ARGV[2])
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[5])
redis.call('HSET', KEYS[5], 'g', 0, 'j', seq, 'st', 'p', 'n', ARGV[3])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
return {epoch, seq}
