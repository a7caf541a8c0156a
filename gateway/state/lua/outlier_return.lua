-- A passing active probe returns an ejected target early.
-- KEYS: the module's hash. ARGV: target, now, ttl. Returns {} or {count}.
local t, now = ARGV[1], ARGV[2]
local ends = tonumber(redis.call('HGET', KEYS[1], 'u:' .. t) or '0')
if ends <= tonumber(now) then return {} end
redis.call('HDEL', KEYS[1], 'u:' .. t, 'c:' .. t)
redis.call('HSET', KEYS[1], 's:' .. t, now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {tonumber(redis.call('HGET', KEYS[1], 'n:' .. t) or '0')}
