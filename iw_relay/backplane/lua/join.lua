-- A member joins a room: checked against the size limit, added, and told to the nodes
-- that have members there; the joining node gets the outcome in its own inbox, in order
-- with everything else it is sent (see iw_relay.backplane.base for the envelope).
-- KEYS: room deadline, room members (connection -> node), this node's rooms.
-- ARGV: node, connection, deadline if new, room ttl ms, node-rooms ttl ms, room hash,
--       max room size (0: none), inbox channel prefix.
local node, conn, h, inbox = ARGV[1], ARGV[2], ARGV[6], ARGV[8]
local header = '1' .. node
local size = redis.call('HLEN', KEYS[2])
local max = tonumber(ARGV[7])
if max > 0 and size >= max then
  redis.call('PUBLISH', inbox .. node, header .. 'f' .. h .. conn)
  return 0
end
local deadline = redis.call('GET', KEYS[1])
if not deadline or size == 0 then
  deadline = ARGV[3]
  redis.call('SET', KEYS[1], deadline, 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
end
local all = redis.call('HGETALL', KEYS[2])
redis.call('HSET', KEYS[2], conn, node)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('SADD', KEYS[3], h)
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local told = {}
local snapshot = {deadline}
for i = 1, #all, 2 do
  local other = all[i + 1]
  snapshot[#snapshot + 1] = ',' .. all[i] .. other
  if other ~= node and not told[other] then
    told[other] = true
    redis.call('PUBLISH', inbox .. other, header .. 'j' .. h .. conn)
  end
end
local body = table.concat(snapshot)
redis.call('PUBLISH', inbox .. node, header .. 'c' .. h .. conn .. #body .. ':' .. body)
return 1
