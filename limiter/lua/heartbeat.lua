-- Edge-node membership: refresh (or withdraw) one node's heartbeat and count the live nodes, on the
-- Redis server clock, in one call.
--
-- Units: time in integer microseconds (µs) of the server clock (TIME).
--
-- KEYS[1]            the node set (a sorted set: member = node id, score = the server time in µs
--                    at which that node stops counting as live)
-- ARGV[1]            node id
-- ARGV[2]            expiry µs: how long after this heartbeat the node still counts as live
-- ARGV[3]            "1" to leave (remove the node now), "0" to announce it
--
-- Returns {now µs, live nodes after this call}. Expired members are dropped first, so a node that
-- died without leaving (SIGKILL) stops counting once its last heartbeat is `expiry` old. The set
-- itself expires (twice the expiry after the last heartbeat of any node), so a dead fleet leaves
-- no key behind.

local node_id, expiry_us, leaving = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now_us))
if leaving then
  redis.call('ZREM', KEYS[1], node_id)
else
  redis.call('ZADD', KEYS[1], string.format('%d', now_us + expiry_us), node_id)
  redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(2 * expiry_us / 1000)))
end
return {now_us, redis.call('ZCARD', KEYS[1])}
