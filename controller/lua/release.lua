-- Give the lease up on shutdown so a follower takes over at its next retry, not after the lease.
-- KEYS[1] leader key; ARGV[1] replica id. Returns 1 when released, 0 when not the holder.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
