-- Keep one relayed frame (connection recovery, cluster mode): the next seq is taken, put
-- into the frame and the frame appended, in one step, so the seq is the same on every
-- node. Then the oldest entries go while the stream is over its count, its bytes, or
-- older than the window; the TTLs are renewed.
-- KEYS: stream, seq, epoch, bytes.
-- ARGV: payload (a compact JSON object), sender, target ('' for none), now (ms),
--       window (ms), max messages, max bytes, new epoch, head ttl (ms).
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[8]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
end
local seq = redis.call('INCR', KEYS[2])
local payload = ARGV[1]
local frame
if payload == '{}' then
  frame = '{"seq":' .. seq .. '}'
else
  frame = string.sub(payload, 1, -2) .. ',"seq":' .. seq .. '}'
end
redis.call('XADD', KEYS[1], seq .. '-1', 'f', frame, 's', ARGV[2], 't', ARGV[3], 'a', ARGV[4])
local bytes = redis.call('INCRBY', KEYS[4], #frame)
local max_messages = tonumber(ARGV[6])
local max_bytes = tonumber(ARGV[7])
local oldest_kept = tonumber(ARGV[4]) - tonumber(ARGV[5])
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
return {seq, frame}
