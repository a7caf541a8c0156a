-- KEYS: one sorted set per scope. ARGV: now, member, mode, then per scope
-- (limit, cutoff, window_ms).
return rate_limit(KEYS, 0, ARGV, 3)
