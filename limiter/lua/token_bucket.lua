-- N-key all-or-nothing token-bucket check-and-consume on the Redis server clock.
--
-- Units: time in integer microseconds (µs), tokens in integer micro-tokens (µt, 1 token =
-- 1e6 µt), rates in tokens/s (= µt per µs). Lua numbers are doubles, exact below 2^53;
-- every quantity here stays far below (capacity <= 1e15 µt, server time ~1.7e15 µs).
-- This script mirrors limiter/bucket.py check_and_consume operation for operation (the same
-- floor/ceil in the same order), so the Python reference decides bit for bit the same.
--
-- KEYS[i]            bucket state hash {t = µt, ts = µs}; all keys share one hash tag
-- ARGV[3i-2]         rate of bucket i, tokens/s
-- ARGV[3i-1]         capacity of bucket i, µt
-- ARGV[3i]           cost charged to bucket i, µt (the caller checked 0 < cost <= capacity)
--
-- Returns {allowed (1/0), now µs, then per key: tokens µt, retry-after µs, reset-after µs}.
-- Every key's state is written back (refilled, and charged when allowed); a bucket that is
-- full again is deleted (a missing key reads as full), otherwise the key PEXPIREs once the
-- bucket would be full again, so idle clients cost no memory.

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local bucket_count = #KEYS

local rates, capacities, costs, tokens = {}, {}, {}, {}
local allowed = true
for i = 1, bucket_count do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity_ut = tonumber(ARGV[3 * i - 1])
  local cost_ut = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens_ut = tonumber(state[1])
  local last_us = tonumber(state[2])
  if tokens_ut == nil or last_us == nil then
    tokens_ut, last_us = capacity_ut, now_us -- first sight: a full bucket
  end
  -- refill(): a clock that went back refills nothing
  local elapsed_us = math.max(now_us - last_us, 0)
  tokens_ut = math.min(capacity_ut, tokens_ut + math.floor(elapsed_us * rate))
  if tokens_ut < cost_ut then
    allowed = false
  end
  rates[i], capacities[i], costs[i], tokens[i] = rate, capacity_ut, cost_ut, tokens_ut
end

local reply = {allowed and 1 or 0, now_us}
for i = 1, bucket_count do
  local rate, capacity_ut, tokens_ut = rates[i], capacities[i], tokens[i]
  if allowed then
    tokens_ut = tokens_ut - costs[i]
  end
  -- wait_us(): ceil(max(missing, 0) / rate)
  local retry_us = 0
  if not allowed then
    retry_us = math.ceil(math.max(costs[i] - tokens_ut, 0) / rate)
  end
  local reset_us = math.ceil(math.max(capacity_ut - tokens_ut, 0) / rate)
  if reset_us == 0 then
    redis.call('DEL', KEYS[i])
  else
    redis.call('HSET', KEYS[i], 't', string.format('%d', tokens_ut), 'ts', string.format('%d', now_us))
    -- keep the key until the bucket is surely full again: one extra µt of refill time covers
    -- the rounding of reset_us; capped at ~300 years so PEXPIRE never overflows
    local expire_ms = math.ceil((reset_us + math.ceil(1 / rate)) / 1000) + 1
    redis.call('PEXPIRE', KEYS[i], string.format('%d', math.min(expire_ms, 1e13)))
  end
  reply[#reply + 1] = tokens_ut
  reply[#reply + 1] = retry_us
  reply[#reply + 1] = reset_us
end
return reply
