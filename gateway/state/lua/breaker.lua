-- Breaker decisions shared by the acquire script and the admission script.
-- Hash fields: state, failures, successes, last_failure, opened_at, forced. Times are
-- stored as the exact strings Python sent (repr of a float), never re-formatted by Lua.
-- ``breaker_peek`` is the read-only part of acquire: a reply when the breaker is closed
-- (allowed) or open before its recovery time (refused), ``nil`` when a decision needs
-- writes (the open -> half-open move, a probe lease).
local function breaker_peek(state_key, now, recovery)
  local h = redis.call('HMGET', state_key, 'state', 'opened_at', 'forced', 'failures')
  local state, forced = h[1] or 'closed', h[3]
  if forced == 'open' then return {0, 'open', '', '', ''} end
  if forced == 'closed' or state == 'closed' then
    if not forced and (tonumber(h[4]) or 0) == 0 then return {1, 'closed', '', '', '', 1} end
    return {1, 'closed', '', '', ''}
  end
  if state == 'open' and tonumber(now) < (tonumber(h[2]) or 0) + tonumber(recovery) then
    return {0, 'open', h[2] or '0', '', ''}
  end
  return nil
end
-- KEYS: state hash, probe leases. ARGV: now, recovery timeout, half_open_max_calls,
-- probe id, lease expiry. Returns {allowed, state, opened_at, earliest lease, moved}.
local function breaker_acquire(keys, argv)
  local seen = breaker_peek(keys[1], argv[1], argv[2])
  if seen then return seen end
  local moved = ''
  if redis.call('HGET', keys[1], 'state') == 'open' then
    redis.call('HSET', keys[1], 'state', 'half_open', 'successes', 0)
    redis.call('DEL', keys[2])
    moved = 'open'
  end
  redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', argv[1])
  if redis.call('ZCARD', keys[2]) < tonumber(argv[3]) then
    redis.call('ZADD', keys[2], argv[5], argv[4])
    return {1, 'half_open', '', '', moved}
  end
  local first = redis.call('ZRANGE', keys[2], 0, 0, 'WITHSCORES')
  return {0, 'half_open', '', first[2], moved}
end
