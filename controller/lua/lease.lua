-- Acquire or renew the leader lease; every new acquisition INCRs the fencing token.
-- KEYS[1] leader key (holder id, PX = lease), KEYS[2] fencing-token counter
-- ARGV[1] replica id, ARGV[2] lease in milliseconds
-- Returns the fencing token (> 0) while this replica holds the lease, 0 when another does.
--
-- A missing counter (first start, or Redis lost its data: restart without persistence, FLUSHALL)
-- starts at the server clock in microseconds, not at 0, so a token handed out after the loss is
-- still larger than every token handed out before it (fewer than one acquisition per microsecond;
-- the server clock does not step back). Tokens stay below 2^53, exact in Lua's doubles.
local leader_key, fence_key = KEYS[1], KEYS[2]
local replica, lease_ms = ARGV[1], ARGV[2]

local function next_fence()
  if redis.call('EXISTS', fence_key) == 0 then
    local now = redis.call('TIME')  -- {seconds, microseconds} as strings
    redis.call('SET', fence_key, now[1] .. string.format('%06d', tonumber(now[2])))
  end
  return redis.call('INCR', fence_key)
end

local holder = redis.call('GET', leader_key)
if holder == replica then
  redis.call('PEXPIRE', leader_key, lease_ms)
  local fence = redis.call('GET', fence_key)
  if fence then return tonumber(fence) end
  return next_fence()  -- the counter alone was lost: a fresh token, still above the old ones
elseif not holder then
  redis.call('SET', leader_key, replica, 'PX', lease_ms)
  return next_fence()
end
return 0
