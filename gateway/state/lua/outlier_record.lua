-- Passive outlier ejection: one target's result, decided atomically for its module.
-- KEYS: the module's hash. ARGV: target, now, failure ('1'/'0'), consecutive threshold,
-- base ejection, max ejection, max ejection percent, targets in the pool, max count,
-- stretch (1 + jitter x U[0,1)), ttl. Fields per target t: c:t consecutive failures,
-- n:t ejection count, s:t healthy since (the end of its last ejection), u:t ejected until.
-- Same arithmetic, in the same order, as gateway/state/ejections.py. Returns {} or
-- {until, count} when this result ejects the target.
local t, now = ARGV[1], tonumber(ARGV[2])
local failure, base = ARGV[3] == '1', tonumber(ARGV[5])
local h = redis.call('HMGET', KEYS[1], 'c:' .. t, 'n:' .. t, 's:' .. t, 'u:' .. t)
local c, n = tonumber(h[1]) or 0, tonumber(h[2]) or 0
local since, ends = tonumber(h[3]) or 0, tonumber(h[4]) or 0
if ends > 0 and ends <= now then
  redis.call('HDEL', KEYS[1], 'u:' .. t)
  ends = 0
end
if n > 0 and now > since then
  local steps = math.floor((now - since) / base)
  if steps >= n then
    n = 0
    redis.call('HDEL', KEYS[1], 'n:' .. t, 's:' .. t)
  elseif steps > 0 then
    n, since = n - steps, since + steps * base
    redis.call('HSET', KEYS[1], 'n:' .. t, n, 's:' .. t, string.format('%.17g', since))
  end
end
if ends > now or not failure then
  if not failure and c > 0 then redis.call('HDEL', KEYS[1], 'c:' .. t) end
  return {}
end
c = c + 1
-- The expiry is set after each write: EXPIRE on a hash that does not exist yet (a
-- module's first failure) does nothing, and the HSET would then create it without one.
if c < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'c:' .. t, c)
  redis.call('EXPIRE', KEYS[1], ARGV[11])
  return {}
end
local ejected, all = 0, redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if string.sub(all[i], 1, 2) == 'u:' and tonumber(all[i + 1]) > now then
    ejected = ejected + 1
  end
end
if ejected > 0 and 100.0 * (ejected + 1) > tonumber(ARGV[7]) * tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[1], 'c:' .. t, c)
  redis.call('EXPIRE', KEYS[1], ARGV[11])
  return {}
end
n = math.min(n + 1, tonumber(ARGV[9]))
local ends_at = string.format('%.17g', now + math.min(base * n, tonumber(ARGV[6])) * tonumber(ARGV[10]))
redis.call('HDEL', KEYS[1], 'c:' .. t)
redis.call('HSET', KEYS[1], 'n:' .. t, n, 's:' .. t, ends_at, 'u:' .. t, ends_at)
redis.call('EXPIRE', KEYS[1], ARGV[11])
return {ends_at, n}
