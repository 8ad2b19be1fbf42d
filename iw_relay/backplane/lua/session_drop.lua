-- A member's connection closed on its node (connection recovery, cluster mode): with
-- grace it is away, and its session lives for the window (the key's TTL is its deadline);
-- else the session ends. Nothing happens if another node holds the session now.
-- KEYS: session. ARGV: node, grace ('1' or '0'), window (ms).
if redis.call('HGET', KEYS[1], 'n') ~= ARGV[1] then return 0 end
if ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'st', 'a')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
