-- A resume claims a session (connection recovery, cluster mode), on any node: it wins if
-- the session lives (an away one's TTL is its deadline) and the token's generation is
-- current, which it then bumps: of two resumes with one token exactly one wins. The
-- member is moved to the claiming node in the room's members, and the other nodes with
-- members there are told with a join entry (a node that knows the member moves it there
-- silently; the node it was on closes any connection still attached to it).
-- KEYS: session, room members, this node's rooms, room deadline.
-- ARGV: generation, node, room hash, inbox prefix, connection, head ttl (ms),
--       node-rooms ttl (ms). Returns {'ok', generation, joined seq, deadline or '',
--       members before (connection, node, ...)} or {reason}.
local g = redis.call('HGET', KEYS[1], 'g')
if not g then return {'session_ended'} end
if tonumber(g) ~= tonumber(ARGV[1]) then return {'token_reused'} end
local node, conn = ARGV[2], ARGV[5]
g = tonumber(g) + 1
redis.call('HSET', KEYS[1], 'g', g, 'st', 'p', 'n', node)
redis.call('PEXPIRE', KEYS[1], ARGV[6])
local all = redis.call('HGETALL', KEYS[2])
redis.call('HSET', KEYS[2], conn, node)
local ttl = redis.call('PTTL', KEYS[4])
redis.call('PEXPIRE', KEYS[2], ttl > 0 and ttl or ARGV[6])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local told = {}
local out = {'ok', g, redis.call('HGET', KEYS[1], 'j'), redis.call('GET', KEYS[4]) or ''}
for i = 1, #all, 2 do
  local other = all[i + 1]
  if all[i] ~= conn then
    out[#out + 1] = all[i]
    out[#out + 1] = other
  end
  if other ~= node and not told[other] then
    told[other] = true
    redis.call('PUBLISH', ARGV[4] .. other, '1' .. node .. 'j' .. ARGV[3] .. conn)
  end
end
return out
