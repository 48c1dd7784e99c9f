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

local floor, ceil, min, max, format = math.floor, math.ceil, math.min, math.max, string.format
local call = redis.call

local time = call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local bucket_count = #KEYS

-- pass 1: refill every bucket; the request passes only if each holds its cost
local tokens = {}
local allowed = true
for i = 1, bucket_count do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity_ut = tonumber(ARGV[3 * i - 1])
  local cost_ut = tonumber(ARGV[3 * i])
  local state = call('HMGET', KEYS[i], 't', 'ts')
  local tokens_ut = tonumber(state[1])
  local last_us = tonumber(state[2])
  if tokens_ut == nil or last_us == nil then
    tokens_ut, last_us = capacity_ut, now_us -- first sight: a full bucket
  end
  -- refill(): a clock that went back refills nothing
  tokens_ut = min(capacity_ut, tokens_ut + floor(max(now_us - last_us, 0) * rate))
  if tokens_ut < cost_ut then
    allowed = false
  end
  tokens[i] = tokens_ut
end

-- pass 2: charge (when allowed), write back, answer
local reply = {allowed and 1 or 0, now_us}
local now_text = format('%d', now_us)
for i = 1, bucket_count do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity_ut = tonumber(ARGV[3 * i - 1])
  local cost_ut = tonumber(ARGV[3 * i])
  local tokens_ut = tokens[i]
  local retry_us = 0
  if allowed then
    tokens_ut = tokens_ut - cost_ut
  else
    retry_us = ceil(max(cost_ut - tokens_ut, 0) / rate) -- wait_us()
  end
  local reset_us = ceil(max(capacity_ut - tokens_ut, 0) / rate) -- wait_us()
  if reset_us == 0 then
    call('DEL', KEYS[i])
  else
    call('HSET', KEYS[i], 't', format('%d', tokens_ut), 'ts', now_text)
    -- keep the key until the bucket is surely full again: one extra µt of refill time covers
    -- the rounding of reset_us; capped at ~300 years so PEXPIRE never overflows
    call('PEXPIRE', KEYS[i], format('%d', min(ceil((reset_us + ceil(1 / rate)) / 1000) + 1, 1e13)))
  end
  reply[3 * i] = tokens_ut
  reply[3 * i + 1] = retry_us
  reply[3 * i + 2] = reset_us
end
return reply
