-- An away member's window passed (connection recovery, cluster mode): is it gone? Yes if
-- its session expired, or is still away on the node asking (then it ends now); no if a
-- resume claimed it meanwhile. For a dead node's member (ARGV[2] = '1', ARGV[1] the dead
-- node) the session ends unless a resume moved it to another node.
-- KEYS: session. ARGV: node, dead ('1' or '0'). Returns 1 when the member is gone.
local state = redis.call('HMGET', KEYS[1], 'st', 'n')
if not state[1] then return 1 end
if state[2] ~= ARGV[1] then return 0 end
if state[1] == 'a' or ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
