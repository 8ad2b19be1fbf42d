-- Relayed frames of one room, in one step (connection recovery, cluster mode): each takes
-- the room's next seq, spliced into the frame, and is appended to the room's stream; then
-- the stamped frames go to the nodes holding the room's members, the sending node
-- included, one envelope per node in seq order: so every node hears one room order, and
-- the seq is the same on every node. A unicast goes only to its target's node. The
-- oldest entries go while the stream is over its count, its bytes, or older than the
-- window; the TTLs are renewed.
-- KEYS: stream, seq, epoch, bytes, members (connection -> node).
-- ARGV: sending node, inbox prefix ('' publishes nothing), room hash, now (ms),
--       window (ms), max messages, max bytes, new epoch, head ttl (ms),
--       then sender, target ('' for none), payload (a compact JSON object) per frame.
-- Returns {last seq, last frame}.
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  redis.call('SET', KEYS[3], ARGV[8])
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
end
local inbox, h, now = ARGV[2], ARGV[3], ARGV[4]
local nodes, order = {}, {}
if inbox ~= '' then
  local all = redis.call('HGETALL', KEYS[5])
  for i = 2, #all, 2 do
    if not nodes[all[i]] then
      nodes[all[i]] = {}
      order[#order + 1] = all[i]
    end
  end
end
local seq, frame
local bytes = tonumber(redis.call('GET', KEYS[4]) or '0')
for i = 10, #ARGV, 3 do
  local sender, target, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  seq = redis.call('INCR', KEYS[2])
  if payload == '{}' then
    frame = '{"seq":' .. seq .. '}'
  else
    frame = string.sub(payload, 1, -2) .. ',"seq":' .. seq .. '}'
  end
  redis.call('XADD', KEYS[1], seq .. '-1', 'f', frame, 's', sender, 't', target, 'a', now)
  bytes = bytes + #frame
  if inbox ~= '' then
    local entry = 's' .. h .. sender .. (target == '' and '----------------' or target)
                  .. seq .. ',' .. #frame .. ':' .. frame
    if target == '' then
      for _, node in ipairs(order) do table.insert(nodes[node], entry) end
    else
      local node = redis.call('HGET', KEYS[5], target)
      if node and nodes[node] then table.insert(nodes[node], entry) end
    end
  end
end
redis.call('SET', KEYS[4], bytes)
local max_messages = tonumber(ARGV[6])
local max_bytes = tonumber(ARGV[7])
local oldest_kept = tonumber(now) - tonumber(ARGV[5])
while true do
  local length = redis.call('XLEN', KEYS[1])
  if length == 0 then break end
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  if length <= max_messages and bytes <= max_bytes and tonumber(first[2][8]) >= oldest_kept then
    break
  end
  redis.call('XDEL', KEYS[1], first[1])
  bytes = redis.call('DECRBY', KEYS[4], #first[2][2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('PEXPIRE', KEYS[3], ARGV[9])
local header = '1' .. ARGV[1]
for _, node in ipairs(order) do
  if #nodes[node] > 0 then
    redis.call('PUBLISH', inbox .. node, header .. table.concat(nodes[node]))
  end
end
return {seq, frame}
