-- Removes a dead node's members; only the first survivor to ask does it, and nobody once
-- the node beats again (it was stalled, not dead: it writes its members back itself).
-- KEYS: all nodes. ARGV: key prefix, dead node.
if redis.call('EXISTS', ARGV[1] .. 'n:' .. ARGV[2]) == 1 then return 0 end
if redis.call('SREM', KEYS[1], ARGV[2]) == 0 then return 0 end
local rooms = ARGV[1] .. 'nr:' .. ARGV[2]
for _, h in ipairs(redis.call('SMEMBERS', rooms)) do
  local members = ARGV[1] .. 'm:' .. h
  local all = redis.call('HGETALL', members)
  for i = 1, #all, 2 do
    if all[i + 1] == ARGV[2] then redis.call('HDEL', members, all[i]) end
  end
  if redis.call('HLEN', members) == 0 then redis.call('DEL', ARGV[1] .. 'r:' .. h) end
end
redis.call('DEL', rooms)
return 1
