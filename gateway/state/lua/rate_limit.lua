-- The sliding-window log (gateway.policies.ratelimit). One layout for every caller:
-- ARGV[1] now, ARGV[2] member, ARGV[3] mode (0 peek, 1 all-or-nothing, 2 charge each
-- admitting scope); the scopes' keys are KEYS[k0 + 1 ..] and their (limit, cutoff,
-- window_ms) triples start after ARGV[a0]. Scores and cutoffs arrive as strings formatted
-- by Python's repr (exact round trip); the script never formats a float itself (Lua's
-- tostring keeps only 14 digits).
-- Returns {admit_1, count_1, score_1, admit_2, ...}: score_k is the entry whose expiry
-- frees a slot ('' when the set is empty); Python computes reset = score + window - now.
local function rate_limit(keys, k0, argv, a0)
  local now = argv[1]
  local member = argv[2]
  local mode = tonumber(argv[3])
  local n = #keys - k0
  local limits, windows, counts, admits = {}, {}, {}, {}
  local all_ok = true
  for i = 1, n do
    local key, base = keys[k0 + i], a0 + (i - 1) * 3
    limits[i] = tonumber(argv[base + 1])
    windows[i] = argv[base + 3]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', argv[base + 2])
    counts[i] = redis.call('ZCARD', key)
    admits[i] = counts[i] < limits[i]
    if not admits[i] then all_ok = false end
  end
  if mode > 0 then
    for i = 1, n do
      if admits[i] and (all_ok or mode == 2) then
        redis.call('ZADD', keys[k0 + i], now, member)
        redis.call('PEXPIRE', keys[k0 + i], windows[i])
        counts[i] = counts[i] + 1
      end
    end
  end
  local out = {}
  for i = 1, n do
    local score = ''
    if counts[i] > 0 then
      local k = counts[i] - limits[i]
      if k < 0 then k = 0 end
      score = redis.call('ZRANGE', keys[k0 + i], k, k, 'WITHSCORES')[2]
    end
    out[#out + 1] = admits[i] and 1 or 0
    out[#out + 1] = counts[i]
    out[#out + 1] = score
  end
  return out
end
