-- Acquire or renew the leader lease; every new acquisition INCRs the fencing token.
-- KEYS[1] leader key (holder id, PX = lease), KEYS[2] fencing-token counter
-- ARGV[1] replica id, ARGV[2] lease in milliseconds
-- Returns the fencing token (> 0) while this replica holds the lease, 0 when another does.
local leader_key, fence_key = KEYS[1], KEYS[2]
local replica, lease_ms = ARGV[1], ARGV[2]

local holder = redis.call('GET', leader_key)
if holder == replica then
  redis.call('PEXPIRE', leader_key, lease_ms)
  local fence = redis.call('GET', fence_key)
  if fence then return tonumber(fence) end
  return redis.call('INCR', fence_key)  -- the counter was lost (flushed): a fresh token
elseif not holder then
  redis.call('SET', leader_key, replica, 'PX', lease_ms)
  return redis.call('INCR', fence_key)
end
return 0
