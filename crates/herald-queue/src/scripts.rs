//! The Lua scripts. Each touches the keys of one queue only (one hash slot)
//! and does bounded work per run, whatever the backlog.

use std::sync::LazyLock;

use redis::Script;

/// Due scheduled jobs promoted, and expired leases reclaimed, per fetch at
/// most. Keeps one script run short and every `unpack` far below Lua's
/// limit of about 8,000 values (the apalis-redis "too many results to
/// unpack" failure); a larger backlog is worked off over successive fetches.
pub(crate) const MAINTENANCE_CHUNK: usize = 500;

/// Fetch: promote, reclaim, pop, lease. One run per queue per round trip.
///
/// KEYS: ready, scheduled, inflight, dead.
/// ARGV: now_ms, lease_deadline_ms, max_pop (≤ 1000), max_handbacks,
///       chunk, dead_cutoff_ms.
///
/// Returns strings: promoted, reclaimed, buried, next scheduled due ms (or
/// ""), next lease deadline ms (or ""), then the popped members.
///
/// Cost: O((chunk + max_pop) · log n), independent of the backlog: every
/// range is `LIMIT`ed and the pop is `RPOP count`.
pub(crate) static FETCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ready, sched, infl, dead = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = tonumber(ARGV[1])
local deadline = ARGV[2]
local max_pop = tonumber(ARGV[3])
local max_handbacks = tonumber(ARGV[4])
local chunk = tonumber(ARGV[5])
local dead_cutoff = tonumber(ARGV[6])

-- (a) promote due delayed jobs, oldest first, a bounded chunk per run
local due = redis.call('ZRANGE', sched, '-inf', now, 'BYSCORE', 'LIMIT', 0, chunk)
if #due > 0 then
  redis.call('LPUSH', ready, unpack(due))
  redis.call('ZREM', sched, unpack(due))
end

-- (b) reclaim jobs whose lease expired (their worker died or lost Redis):
-- count the handback, then back to the front of ready, or dead past the limit
local reclaimed, buried = 0, 0
local expired = redis.call('ZRANGE', infl, '-inf', now, 'BYSCORE', 'LIMIT', 0, chunk)
for i = 1, #expired do
  local m = expired[i]
  redis.call('ZREM', infl, m)
  local head, h, tail = string.match(m, '^(1|[^|]+|[^|]+|)(%d+)(|%d+|.*)$')
  if head then
    local n = tonumber(h) + 1
    local nm = head .. string.format('%d', n) .. tail
    if n > max_handbacks then
      redis.call('ZADD', dead, now, nm)
      buried = buried + 1
    else
      redis.call('RPUSH', ready, nm)
      reclaimed = reclaimed + 1
    end
  else
    redis.call('ZADD', dead, now, m)
    buried = buried + 1
  end
end

-- (c) trim the dead set: entries older than the cutoff, a bounded chunk
local old = redis.call('ZRANGE', dead, '-inf', dead_cutoff, 'BYSCORE', 'LIMIT', 0, 100)
if #old > 0 then
  redis.call('ZREMRANGEBYRANK', dead, 0, #old - 1)
end

-- (d) pop up to max_pop ready jobs and lease them
local out = {tostring(#due), tostring(reclaimed), tostring(buried), '', ''}
local popped = redis.call('RPOP', ready, max_pop)
if popped then
  local args = {}
  for i = 1, #popped do
    args[2 * i - 1] = deadline
    args[2 * i] = popped[i]
    out[5 + i] = popped[i]
  end
  redis.call('ZADD', infl, unpack(args))
end

-- when the caller should look again if it finds nothing now
local s = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
if s[2] then out[4] = s[2] end
local l = redis.call('ZRANGE', infl, 0, 0, 'WITHSCORES')
if l[2] then out[5] = l[2] end
return out
"#,
    )
});

/// Moves jobs out of `inflight`, but only those still there (a job whose
/// lease expired was already reclaimed: moving it again would duplicate it).
///
/// KEYS: inflight, scheduled, dead, ready.
/// ARGV: groups of (kind, old member, new member, score), kind `s`
/// (to scheduled at score), `d` (to dead at score) or `r` (to the front of
/// ready, unstarted). Returns how many moved.
pub(crate) static MOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local moved = 0
for i = 1, #ARGV, 4 do
  local kind, old, new, score = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('ZREM', KEYS[1], old) == 1 then
    if kind == 's' then
      redis.call('ZADD', KEYS[2], score, new)
    elseif kind == 'd' then
      redis.call('ZADD', KEYS[3], score, new)
    else
      redis.call('RPUSH', KEYS[4], new)
    end
    moved = moved + 1
  end
end
return moved
"#,
    )
});
