-- All-or-nothing token-bucket check-and-consume on the Redis server clock, for one check or a
-- batch of checks decided one after the other (exactly as separate calls in that order would be,
-- all at the same server instant).
--
-- Units: time in integer microseconds (µs), tokens in integer micro-tokens (µt, 1 token =
-- 1e6 µt), rates in tokens/s (= µt per µs). Lua numbers are doubles, exact below 2^53;
-- every quantity here stays far below (capacity <= 1e15 µt, server time ~1.7e15 µs).
-- This script mirrors limiter/bucket.py check_and_consume operation for operation (the same
-- floor/ceil in the same order), so the Python reference decides bit for bit the same.
--
-- KEYS               the bucket keys of every check, check after check (a check's keys share
--                    one hash tag); state is the string "TOKENS_µt:TIMESTAMP_µs"
-- ARGV, per check    n (its key count), then per key: rate (tokens/s), capacity µt, cost µt
--                    (the caller checked 0 < cost <= capacity)
--
-- Returns {now µs, then per check: allowed (1/0), tokens µt per key after the decision}; a check
-- that met a Redis error answers the error text instead, in one element, and the others still
-- run. Retry-after and reset-after follow from the tokens (limiter/bucket.py wait_us), so the
-- caller computes them and the reply stays short.
-- Every key's state is written back once, after the last check of the batch (refilled, and
-- charged when allowed); a bucket that is full again is deleted (a missing key reads as full),
-- otherwise the key expires (PX) once the bucket would be full again, so idle clients cost no
-- memory. A write-back that Redis refuses fails the whole script: no check is answered and the
-- caller falls back (under OOM Redis refuses the first write, so nothing is charged).

local floor, ceil, min, max, format, find, sub = math.floor, math.ceil, math.min, math.max, string.format, string.find, string.sub
local call, pcall, tonumber = redis.call, pcall, tonumber

local time = call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_suffix = format(':%d', now_us)

local rates, capacities, costs, tokens = {}, {}, {}, {}
-- A key's state once this script has read or decided it: {tokens_ut, last_us}, or false for a
-- bucket that is full (a missing key). Later checks of the same key in this batch (the tier bucket
-- in every check) read it from here, and each key is written back once, after the last check:
-- the same end state as a write per check, because every check runs at the same instant.
local states, written, order = {}, {}, {}

local function read_state(key)
  local cached = states[key]
  if cached ~= nil then
    if cached then
      return cached[1], cached[2]
    end
    return nil, nil
  end
  local state = redis.pcall('GET', key)
  if type(state) == 'table' and state.err then
    -- a hash written by an earlier version of this script (fields t, ts); SET replaces it
    local fields = call('HMGET', key, 't', 'ts')
    return tonumber(fields[1]), tonumber(fields[2])
  end
  if not state then
    return nil, nil
  end
  local sep = find(state, ':', 1, true)
  return tonumber(sub(state, 1, sep - 1)), tonumber(sub(state, sep + 1))
end

-- one check: KEYS[first + 1 .. first + n], ARGV[arg + 1 .. arg + 3n]; appends to reply
local function check(first, arg, n, reply)
  -- pass 1: refill every bucket; the request passes only if each holds its cost
  local allowed = true
  for i = 1, n do
    local at = arg + 3 * i
    local rate, capacity_ut, cost_ut = tonumber(ARGV[at - 2]), tonumber(ARGV[at - 1]), tonumber(ARGV[at])
    local tokens_ut, last_us = read_state(KEYS[first + i])
    if tokens_ut == nil or last_us == nil then
      tokens_ut, last_us = capacity_ut, now_us -- first sight: a full bucket
    end
    -- refill(): a clock that went back refills nothing
    tokens_ut = min(capacity_ut, tokens_ut + floor(max(now_us - last_us, 0) * rate))
    if tokens_ut < cost_ut then
      allowed = false
    end
    rates[i], capacities[i], costs[i], tokens[i] = rate, capacity_ut, cost_ut, tokens_ut
  end
  -- pass 2: charge (when allowed), remember the new state for the write-back
  local answer = {allowed and 1 or 0}
  for i = 1, n do
    local rate, tokens_ut = rates[i], tokens[i]
    if allowed then
      tokens_ut = tokens_ut - costs[i]
    end
    local reset_us = ceil(max(capacities[i] - tokens_ut, 0) / rate) -- wait_us()
    local key = KEYS[first + i]
    if written[key] == nil then
      order[#order + 1] = key
    end
    if reset_us == 0 then
      states[key], written[key] = false, false
    else
      states[key], written[key] = {tokens_ut, now_us}, {tokens_ut, reset_us, rate}
    end
    answer[i + 1] = tokens_ut
  end
  for i = 1, n + 1 do
    reply[#reply + 1] = answer[i]
  end
end

local reply = {now_us}
local first, arg, argc = 0, 1, #ARGV
while arg <= argc do
  local n = tonumber(ARGV[arg])
  local ok, err = pcall(check, first, arg, n, reply)
  if not ok then
    reply[#reply + 1] = type(err) == 'table' and (err.err or 'error') or tostring(err)
  end
  first, arg = first + n, arg + 3 * n + 1
end

-- write-back: a bucket that is full again is deleted; otherwise the key is kept until the bucket
-- is surely full again (one extra µt of refill time covers the rounding of reset_us; capped at
-- ~300 years so PX never overflows)
for i = 1, #order do
  local key = order[i]
  local state = written[key]
  if state then
    local reset_us, rate = state[2], state[3]
    call('SET', key, format('%d', state[1]) .. now_suffix, 'PX', format('%d', min(ceil((reset_us + ceil(1 / rate)) / 1000) + 1, 1e13)))
  else
    call('DEL', key)
  end
end
return reply
