-- KEYS: state hash, probe leases. Returns 1 when an open breaker moved to half-open.
local h = redis.call('HMGET', KEYS[1], 'state', 'forced')
if h[2] or h[1] ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'successes', 0)
redis.call('DEL', KEYS[2])
return 1
