-- One batch of readings: per reading an id from its tenant's clock, XADD + XTRIM + HSET + SADD +
-- PUBLISH, then each tenant's clock and the producer's highest applied seq, in one atomic step
-- (history and live never disagree, and a tenant's live order is its id order).
-- KEYS: per reading log, latest, wells, clock; then the producer's key when there is a producer.
-- ARGV: maxlen, age_ms, producer ('' = no dedupe), then per reading: well, tag, channel, json, seq.
local maxlen, age_ms = ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = nil
if age_ms > 0 then minid = string.format('%d-0', now - age_ms) end
local n = #KEYS
local producer, applied = nil, -1
if ARGV[3] ~= '' then
  producer = KEYS[n]
  n = n - 1
  applied = tonumber(redis.call('GET', producer) or '-1')
end

local function split(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local clocks = {}
local function advance(key, floor)
  local c = clocks[key]
  if c == nil then
    local ms, seq = split(redis.call('GET', key) or '0-0')
    c = {ms, seq}
  end
  if floor and (floor[1] > c[1] or (floor[1] == c[1] and floor[2] > c[2])) then c = floor end
  if now > c[1] then c = {now, 0} else c = {c[1], c[2] + 1} end
  clocks[key] = c
  return string.format('%d-%d', c[1], c[2])
end

local function last_generated(log)
  local info = redis.call('XINFO', 'STREAM', log)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local ms, seq = split(info[i + 1])
      return {ms, seq}
    end
  end
end

local top = applied
local ids, problems, issued = {}, {}, {}
for i = 0, (n / 4) - 1 do
  local seq = tonumber(ARGV[5 * i + 8])
  if producer == nil or seq > applied then
    local log, latest, wells, clock = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
    local well, tag, channel, json = ARGV[5 * i + 4], ARGV[5 * i + 5], ARGV[5 * i + 6], ARGV[5 * i + 7]
    local id = advance(clock)
    -- pcall: a key of the wrong type (written by something else) must not abort the script
    -- half-way, which would leave the batch half-applied and make every retry repeat that half.
    local added = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, id, 'r', json)
    if type(added) == 'table' and string.find(added.err, 'equal or smaller', 1, true) then
      -- The clock is behind this log (it was lost, or the log predates it): move it past.
      id = advance(clock, last_generated(log))
      added = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, id, 'r', json)
    end
    if type(added) == 'table' then
      problems[#problems + 1] = 'rejected ' .. log .. ': ' .. added.err
    else
      if minid then redis.pcall('XTRIM', log, 'MINID', '~', minid) end
      local ok = redis.pcall('HSET', latest, tag, json)
      if type(ok) == 'table' then problems[#problems + 1] = 'latest not kept ' .. latest .. ': ' .. ok.err end
      ok = redis.pcall('SADD', wells, well)
      if type(ok) == 'table' then problems[#problems + 1] = 'not registered ' .. wells .. ': ' .. ok.err end
      issued[clock] = id
      redis.call('PUBLISH', channel, id .. ' ' .. json)
      ids[#ids + 1] = id
    end
    if seq > top then top = seq end
  end
end
for clock, id in pairs(issued) do redis.call('SET', clock, id) end
if producer and top > applied then redis.call('SET', producer, top, 'EX', 2592000) end
return {ids, problems}
