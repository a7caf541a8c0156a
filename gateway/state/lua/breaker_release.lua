-- KEYS: probe leases. ARGV: probe id.
return redis.call('ZREM', KEYS[1], ARGV[1])
