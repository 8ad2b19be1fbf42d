-- A node says it lives. Returns 0 when its key had expired: the others may have found
-- it dead and removed its members. KEYS: node key, all nodes. ARGV: node, ttl ms,
-- all-nodes ttl ms.
local alive = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return alive
