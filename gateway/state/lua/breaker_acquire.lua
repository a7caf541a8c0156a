return breaker_acquire(KEYS, ARGV)
