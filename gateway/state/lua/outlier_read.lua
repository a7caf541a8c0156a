-- One module's outlier state, read whole (a script so it runs on the request path's
-- pipelined connection like every other store call). KEYS: the module's hash.
return redis.call('HGETALL', KEYS[1])
