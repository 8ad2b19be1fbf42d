-- A member leaves: removed, and told to the other nodes that have members in the room.
-- KEYS: room deadline, room members. ARGV: node, connection, room hash, inbox prefix.
local node = ARGV[1]
if redis.call('HGET', KEYS[2], ARGV[2]) == node then
  redis.call('HDEL', KEYS[2], ARGV[2])
end
local all = redis.call('HGETALL', KEYS[2])
if #all == 0 then redis.call('DEL', KEYS[1]) end
local told = {}
for i = 2, #all, 2 do
  local other = all[i]
  if other ~= node and not told[other] then
    told[other] = true
    redis.call('PUBLISH', ARGV[4] .. other, '1' .. node .. 'l' .. ARGV[3] .. ARGV[2])
  end
end
return 1
