-- Rate limit and breaker peek in one round trip (gateway.policies.admission).
-- KEYS: the breaker's state hash and probe leases, then the rate-limit scopes.
-- ARGV: now, member, mode (the rate limit's leading arguments), shadow ('1': peek even when
-- refused), the breaker's now and recovery timeout, then the scopes' triples.
-- Reply: {rate-limit reply} when refused, else {rate-limit reply, peek reply or nil}.
local limits = rate_limit(KEYS, 2, ARGV, 6)
if ARGV[4] ~= '1' then
  for i = 1, #KEYS - 2 do
    if limits[3 * i - 2] == 0 then return {limits} end
  end
end
local seen = breaker_peek(KEYS[1], ARGV[5], ARGV[6])
if seen then return {limits, seen} end
return {limits}
