-- Active health per target: the health worker's verdict (SPEC §18). KEYS: the module's hash.
-- ARGV: target, down ('1'/'0'), ttl. Field d:t = '1' while the target is down; a down flag
-- renews the hash's expiry (the worker repeats it on every failing probe). Returns 1 when
-- the flag changed, else 0.
local f = 'd:' .. ARGV[1]
if ARGV[2] == '1' then
  local added = redis.call('HSET', KEYS[1], f, '1')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return added
end
return redis.call('HDEL', KEYS[1], f)
