-- Write every tier's rate and append the tick's decisions, atomically and only with a valid fence.
-- KEYS[1] rates hash, KEYS[2] version counter, KEYS[3] leader key, KEYS[4] fencing-token counter,
-- KEYS[5] decisions stream
-- ARGV[1] replica id, ARGV[2] fencing token ('' when leader election is off),
-- ARGV[3] ttl in seconds, ARGV[4] '1' to write rates ('0' = shadow: decisions only),
-- ARGV[5] decisions stream MAXLEN (approximate), ARGV[6] number of tiers n,
-- then per tier 5 values: name, rate (tokens/s, JSON number), burst (tokens), source, decision JSON.
-- Returns {version, server time in µs} or {-1, reason} when the lease or the fence does not match:
-- a paused-then-resumed ex-leader's late write is refused here, inside Redis.
local rates_key, version_key, leader_key, fence_key, decisions_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local replica, fence, ttl_s = ARGV[1], ARGV[2], tonumber(ARGV[3])
local write_rates, maxlen, n = ARGV[4] == '1', ARGV[5], tonumber(ARGV[6])
local FIRST, PER_TIER, CHUNK = 7, 5, 500  -- CHUNK keeps unpack() below Lua's stack limit

if fence ~= '' then
  if redis.call('GET', leader_key) ~= replica then
    return {-1, 'lease not held by ' .. replica}
  end
  if redis.call('GET', fence_key) ~= fence then
    return {-1, 'fencing token ' .. fence .. ' is stale'}
  end
end

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local written_at = string.format('%.6f', now_us / 1e6)
local expires_at = string.format('%.6f', now_us / 1e6 + ttl_s)
local version = 0
if write_rates then
  version = redis.call('INCR', version_key)
  local fields = {}
  for i = 0, n - 1 do
    local base = FIRST + i * PER_TIER
    fields[#fields + 1] = ARGV[base]
    fields[#fields + 1] = '{"rate":' .. ARGV[base + 1] .. ',"burst":' .. ARGV[base + 2] .. ',"version":' .. version
      .. ',"source":"' .. ARGV[base + 3] .. '","written_at":' .. written_at .. ',"expires_at":' .. expires_at .. '}'
    if #fields >= 2 * CHUNK or i == n - 1 then
      redis.call('HSET', rates_key, unpack(fields))
      fields = {}
    end
  end
end
for i = 0, n - 1 do
  local base = FIRST + i * PER_TIER
  redis.call('XADD', decisions_key, 'MAXLEN', '~', maxlen, '*',
    'tier', ARGV[base], 'version', version, 'fence', fence, 'replica', replica, 'decision', ARGV[base + 4])
end
return {version, now_us}
