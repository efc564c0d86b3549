-- An ingest worker's lease on one tenant: renewed (expiring ttl_ms from Redis's own clock, so
-- no two clocks are compared), and on its first beat a claim of the tags it feeds, taken from
-- any other worker (a restarted worker's earlier run must not mark them stale when it expires).
-- KEYS: the tenant's workers sorted set. ARGV: tenant key prefix, worker, ttl_ms, then tags as well/tag.
-- Returns 1 when the lease was not held (first beat, or it ran out and was swept), else 0.
local workers, prefix, worker = KEYS[1], ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', workers, now + tonumber(ARGV[3]), worker)
if #ARGV > 3 then
  local mine = prefix .. 'worker:' .. worker
  local others = redis.call('ZRANGE', workers, 0, -1)
  redis.call('DEL', mine)
  -- In slices: unpack() of thousands of arguments overflows Lua's stack.
  for first = 4, #ARGV, 1000 do
    local slice = {unpack(ARGV, first, math.min(first + 999, #ARGV))}
    for _, other in ipairs(others) do
      if other ~= worker then redis.call('SREM', prefix .. 'worker:' .. other, unpack(slice)) end
    end
    redis.call('SADD', mine, unpack(slice))
  end
end
return new
