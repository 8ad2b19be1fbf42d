-- After an outage, writes a node's members of one room back: those that left meanwhile
-- go, those present are added; the other nodes with members there are told of every one
-- (they may have dropped them, finding this node dead while it was only stalled; a node
-- ignores a join it knows). Returns {deadline or '', members (connection, node, ...)}.
-- KEYS: room deadline, room members, this node's rooms.
-- ARGV: node, deadline if new, room ttl ms, node-rooms ttl ms, room hash, inbox prefix,
--       number of departed, departed..., present...
local node, h, inbox = ARGV[1], ARGV[5], ARGV[6]
local header = '1' .. node
local departed = tonumber(ARGV[7])
local changes = {}
for i = 8, 7 + departed do
  if redis.call('HGET', KEYS[2], ARGV[i]) == node then redis.call('HDEL', KEYS[2], ARGV[i]) end
  changes[#changes + 1] = 'l' .. h .. ARGV[i]
end
local present = #ARGV - 7 - departed
local deadline = redis.call('GET', KEYS[1])
if present > 0 then
  if not deadline or redis.call('HLEN', KEYS[2]) == 0 then
    deadline = ARGV[2]
    redis.call('SET', KEYS[1], deadline, 'PX', ARGV[3])
  end
  for i = 8 + departed, #ARGV do
    redis.call('HSET', KEYS[2], ARGV[i], node)
    changes[#changes + 1] = 'j' .. h .. ARGV[i]
  end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  redis.call('SADD', KEYS[3], h)
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
elseif redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
end
local all = redis.call('HGETALL', KEYS[2])
if #changes > 0 then
  local body = header .. table.concat(changes)
  local told = {}
  for i = 2, #all, 2 do
    local other = all[i]
    if other ~= node and not told[other] then
      told[other] = true
      redis.call('PUBLISH', inbox .. other, body)
    end
  end
end
return {deadline or '', all}
