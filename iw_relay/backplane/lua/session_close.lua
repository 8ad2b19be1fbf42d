-- An away member's window passed (connection recovery, cluster mode): is it gone? Yes if
-- its session expired, or is still held by the node it dropped from (ARGV[1]: the node
-- asking, or a dead node), and then the session ends now; no if a resume moved it to
-- another node meanwhile.
-- KEYS: session. ARGV: node. Returns 1 when the member is gone.
local node = redis.call('HGET', KEYS[1], 'n')
if not node then return 1 end
if node ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
