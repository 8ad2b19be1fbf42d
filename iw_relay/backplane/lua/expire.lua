-- A room expired: its keys go, the other nodes with members there are told.
-- KEYS: room deadline, room members. ARGV: node, room hash, inbox prefix.
local all = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
local told = {}
for i = 2, #all, 2 do
  local other = all[i]
  if other ~= ARGV[1] and not told[other] then
    told[other] = true
    redis.call('PUBLISH', ARGV[3] .. other, '1' .. ARGV[1] .. 'x' .. ARGV[2])
  end
end
return 1
