-- What a resuming member missed (connection recovery, cluster mode): every kept entry
-- after `since`, or why they cannot all be given. The caller filters by sender and target.
-- KEYS: stream, seq, epoch. ARGV: since, epoch, now (ms), window (ms).
-- Returns {'ok', last seq, frame, sender, target, ...} or {reason}.
local epoch = redis.call('GET', KEYS[3])
if not epoch or epoch ~= ARGV[2] then return {'epoch_changed'} end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[1])
if since > last then return {'bad_since'} end
if since == last then return {'ok', last} end
local oldest_kept = tonumber(ARGV[3]) - tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], '(' .. since .. '-1', '+')
local first = entries[1]
if not first or tonumber(string.match(first[1], '^(%d+)')) ~= since + 1
    or tonumber(first[2][8]) < oldest_kept then
  return {'history_trimmed'}
end
local out = {'ok', last}
for _, entry in ipairs(entries) do
  local fields = entry[2]
  out[#out + 1] = fields[2]
  out[#out + 1] = fields[4]
  out[#out + 1] = fields[6]
end
return out
