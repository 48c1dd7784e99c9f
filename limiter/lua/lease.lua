-- Token leases for local mode: per bucket, take back what a node returns and grant what it asks,
-- from the same bucket state token_bucket.lua keeps, on the Redis server clock, in one call.
--
-- Units: time in integer microseconds (µs), tokens in integer micro-tokens (µt, 1 token = 1e6 µt),
-- rates in tokens/s (= µt per µs). Lua numbers are doubles, exact below 2^53; every quantity here
-- stays far below (capacity <= 1e15 µt, server time ~1.7e15 µs). The refill is token_bucket.lua's
-- (limiter/bucket.py refill), operation for operation.
--
-- KEYS               the bucket keys (state: the string "TOKENS_µt:TIMESTAMP_µs", as token_bucket.lua)
-- ARGV, per key      rate (tokens/s), capacity µt, returned µt (tokens the node gives back: it no
--                    longer spends them), wanted µt (tokens the node asks for)
--
-- Returns {now µs, then per key: granted µt, tokens µt left in the bucket}. Per key: refill to now, add the returned tokens
-- (capped at the capacity: a return never fills a bucket past full), grant min(tokens, wanted) and
-- debit it. The write-back is token_bucket.lua's: a bucket full again is deleted (a missing key reads
-- as full), otherwise it expires (PX) once it would be full again. The caller counts every granted
-- token as spent until it returns it; a call whose answer is lost is never resent (a grant lost is
-- under-admission, never a double spend).

local floor, ceil, min, max, format, find, sub = math.floor, math.ceil, math.min, math.max, string.format, string.find, string.sub
local call, tonumber = redis.call, tonumber

local time = call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_suffix = format(':%d', now_us)

local reply = {now_us}
for i = 1, #KEYS do
  local at = 4 * i
  local rate, capacity_ut = tonumber(ARGV[at - 3]), tonumber(ARGV[at - 2])
  local returned_ut, wanted_ut = tonumber(ARGV[at - 1]), tonumber(ARGV[at])
  local key = KEYS[i]
  local tokens_ut, last_us = capacity_ut, now_us -- first sight: a full bucket
  local state = call('GET', key)
  if state then
    local sep = find(state, ':', 1, true)
    tokens_ut, last_us = tonumber(sub(state, 1, sep - 1)), tonumber(sub(state, sep + 1))
  end
  -- refill(): a clock that went back refills nothing
  tokens_ut = min(capacity_ut, tokens_ut + floor(max(now_us - last_us, 0) * rate))
  tokens_ut = min(capacity_ut, tokens_ut + returned_ut)
  local granted_ut = min(max(tokens_ut, 0), wanted_ut)
  tokens_ut = tokens_ut - granted_ut
  local reset_us = ceil(max(capacity_ut - tokens_ut, 0) / rate) -- wait_us()
  if reset_us == 0 then
    call('DEL', key)
  else
    call('SET', key, format('%d', tokens_ut) .. now_suffix, 'PX', format('%d', min(ceil((reset_us + ceil(1 / rate)) / 1000) + 1, 1e13)))
  end
  reply[2 * i], reply[2 * i + 1] = granted_ut, tokens_ut
end
return reply
