"""The Lua scripts: each is one step on keys of one hash slot (a task's ``{<id>}`` keys, or
admission's ``{adm}``), so that it runs whole on a Redis Cluster too."""

# KEYS: counts, owned (task -> user, of this replica), the user's tasks, replicas.
# ARGV: task, user, max total, max per user, replica. Idempotent: 1 once reserved. The
# user's tasks are a sorted set scored by when each expires: a running one never.
RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 1 end
local total = tonumber(redis.call('HGET', KEYS[1], '*') or '0')
local mine = tonumber(redis.call('HGET', KEYS[1], 'u:' .. ARGV[2]) or '0')
if total >= tonumber(ARGV[3]) or mine >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], '*', 1)
redis.call('HINCRBY', KEYS[1], 'u:' .. ARGV[2], 1)
redis.call('ZADD', KEYS[3], 'inf', ARGV[1])
redis.call('PERSIST', KEYS[3])
redis.call('SADD', KEYS[4], ARGV[5])
return 1
"""

# KEYS: counts, owned, ended (the retained tasks, scored by when they expire), the user's
# tasks. ARGV: task, retention ms, max retained, user. Frees the task's place, gives its
# entry in its user's tasks the task's expiry (the set lives as long as its last entry),
# and returns the retained tasks past the max retained, oldest first, taken out of
# ``ended`` for the caller to delete (their users' entries go when next listed).
# Idempotent: {} if the place was freed already.
RELEASE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return {} end
local user = ARGV[4]
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[1], '*', -1) <= 0 then redis.call('HDEL', KEYS[1], '*') end
local u = 'u:' .. user
if redis.call('HINCRBY', KEYS[1], u, -1) <= 0 then redis.call('HDEL', KEYS[1], u) end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expires = now + tonumber(ARGV[2])
local tasks = KEYS[4]
redis.call('ZADD', tasks, expires, ARGV[1])
redis.call('ZREMRANGEBYSCORE', tasks, '-inf', now)
local last = redis.call('ZRANGE', tasks, -1, -1, 'WITHSCORES')
if last[2] and last[2] ~= 'inf' then redis.call('PEXPIREAT', tasks, last[2]) end
redis.call('ZADD', KEYS[3], expires, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('PEXPIREAT', KEYS[3], expires)
local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[3])
if excess <= 0 then return {} end
local evicted = {}
local popped = redis.call('ZPOPMIN', KEYS[3], excess)
for i = 1, #popped, 2 do evicted[#evicted + 1] = popped[i] end
return evicted
"""

# KEYS: rec, log. ARGV: queued event data, then field/value pairs of the record.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('XADD', KEYS[2], '0-1', 't', 'task:queued', 'd', ARGV[1])
return 1
"""

# KEYS: rec, log, content, reasoning, sources. ARGV: seq, type, data, content, reasoning,
# source, the writing replica. 1 written; 2 written before (a retried call); 0 the log is
# closed; -1 the task is gone (expired, or Redis lost it); -2 a seq out of step; -3 the
# writer does not own the task. The fence: a replica reaped while Redis could not hear
# it (its log closed by the reaper) has its late appends refused, not added after the end.
APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[7] then return -3 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
local seq = tonumber(ARGV[1])
if seq <= last then return 2 end
if seq ~= last + 1 then return -2 end
redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 't', ARGV[2], 'd', ARGV[3])
if ARGV[4] ~= '' then redis.call('APPEND', KEYS[3], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('APPEND', KEYS[4], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('RPUSH', KEYS[5], ARGV[6]) end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[1])
return 1
"""

# KEYS: rec, log, content, reasoning, sources. ARGV: seq, type, data, retention ms,
# content, reasoning, sources (a JSON list), then field/value pairs of the record.
# 1 written; 0 the log was closed already (someone else ended the task); -2 a seq out of
# step (the log moved on: read again). A task Redis lost is written anew, terminal only.
FINISH = """
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(ARGV[1]) ~= last + 1 then return -2 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5]) end
  if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
  local sources = cjson.decode(ARGV[7])
  for i = 1, #sources do redis.call('RPUSH', KEYS[5], cjson.encode(sources[i])) end
end
redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 't', ARGV[2], 'd', ARGV[3])
redis.call('HSET', KEYS[1], 'closed', '1', unpack(ARGV, 8))
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"""


# KEYS: the session. ARGV: user, replica, delta (0: claim only), idle lifetime ms.
# -1 the session is another user's. A session with no connection left expires after the
# lifetime; one with connections does not.
SESSION = """
local owner = redis.call('HGET', KEYS[1], 'user')
if owner and owner ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'user', ARGV[1])
local field = 'c:' .. ARGV[2]
if tonumber(ARGV[3]) ~= 0 then
  if redis.call('HINCRBY', KEYS[1], field, ARGV[3]) <= 0 then
    redis.call('HDEL', KEYS[1], field)
  end
end
if redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"""
