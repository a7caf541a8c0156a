-- KEYS: state hash, probe leases, failure-rate window. ARGV: now, failure ('1'/'0'), probe id
-- ('' for none), failure_threshold, success_threshold, bucket width (0: no window),
-- failure_rate_threshold, min_calls, buckets. Returns {} or {from, to, reason}.
local failure = ARGV[2] == '1'
local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'successes', 'forced')
local state, forced = h[1] or 'closed', h[4]
local failures, successes = tonumber(h[2]) or 0, tonumber(h[3]) or 0
local held = 0
if ARGV[3] ~= '' then held = redis.call('ZREM', KEYS[2], ARGV[3]) end
local function open(reason)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'successes', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
  return {state, 'open', reason}
end
if forced == 'open' or (not forced and state == 'open') then
  if failure then redis.call('HSET', KEYS[1], 'last_failure', ARGV[1]) end
  return {}
end
if failure then redis.call('HSET', KEYS[1], 'last_failure', ARGV[1]) end
if forced == 'closed' or state == 'closed' then
  if failure then failures = failures + 1 else failures = 0 end
  redis.call('HSET', KEYS[1], 'failures', failures)
  if forced then return {} end
  if failure and failures >= tonumber(ARGV[4]) then return open('failure_threshold') end
  local width = tonumber(ARGV[6])
  if width > 0 then
    local bucket = math.floor(tonumber(ARGV[1]) / width)
    redis.call('HINCRBY', KEYS[3], 'c:' .. bucket, 1)
    if failure then redis.call('HINCRBY', KEYS[3], 'f:' .. bucket, 1) end
    local calls, fails = 0, 0
    local all = redis.call('HGETALL', KEYS[3])
    for i = 1, #all, 2 do
      local b = tonumber(string.sub(all[i], 3))
      if b <= bucket - tonumber(ARGV[9]) then
        redis.call('HDEL', KEYS[3], all[i])
      elseif string.sub(all[i], 1, 1) == 'c' then
        calls = calls + tonumber(all[i + 1])
      else
        fails = fails + tonumber(all[i + 1])
      end
    end
    if failure and calls >= tonumber(ARGV[8]) and fails / calls >= tonumber(ARGV[7]) then
      return open('failure_rate')
    end
  end
  return {}
end
if held == 0 then return {} end
if failure then
  redis.call('HSET', KEYS[1], 'failures', failures + 1)
  return open('probe_failed')
end
successes = successes + 1
if successes < tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'successes', successes)
  return {}
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0)
redis.call('HDEL', KEYS[1], 'opened_at')
redis.call('DEL', KEYS[2], KEYS[3])
return {'half_open', 'closed', 'probe_succeeded'}
