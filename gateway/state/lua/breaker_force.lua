-- KEYS: state hash, probe leases, window. ARGV: action. Returns {before, after}.
local h = redis.call('HMGET', KEYS[1], 'state', 'forced')
local state = h[1] or 'closed'
local before, after = h[2] or state, state
if ARGV[1] == 'reset' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  after = 'closed'
elseif ARGV[1] == 'force_open' then
  redis.call('HSET', KEYS[1], 'forced', 'open')
  after = 'open'
elseif ARGV[1] == 'force_closed' then
  redis.call('HSET', KEYS[1], 'forced', 'closed')
  after = 'closed'
else
  redis.call('HDEL', KEYS[1], 'forced')
end
return {before, after}
