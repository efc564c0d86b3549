-- One tenant's part of a batch of readings (every key in the tenant's slot): per reading an id
-- from the tenant's clock, XADD + XTRIM + HSET + SADD + SPUBLISH, then the clock and the
-- producer's highest applied seq for the tenant, in one atomic step (history and live never
-- disagree, and a tenant's live order is its id order).
-- KEYS: per reading log, latest, wells, clock; then the producer's key when there is a producer.
-- ARGV: maxlen, age_ms, producer ('' = no dedupe), then per reading: well, tag, channel, json, seq.
-- Returns {per reading its id or '', problems}.
-- clock.lua comes first: now, advance(), append().
local maxlen, age_ms = ARGV[1], tonumber(ARGV[2])
local minid = nil
if age_ms > 0 then minid = string.format('%d-0', now - age_ms) end
local n = #KEYS
local producer, applied = nil, -1
if ARGV[3] ~= '' then
  producer = KEYS[n]
  n = n - 1
  applied = tonumber(redis.call('GET', producer) or '-1')
end

local top = applied
local ids, problems, issued = {}, {}, {}
for i = 0, (n / 4) - 1 do
  local seq = tonumber(ARGV[5 * i + 8])
  ids[i + 1] = ''  -- one entry per reading: its id, or '' when it was skipped or refused
  if producer == nil or seq > applied then
    local log, latest, wells, clock = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
    local well, tag, channel, json = ARGV[5 * i + 4], ARGV[5 * i + 5], ARGV[5 * i + 6], ARGV[5 * i + 7]
    local id = append(log, clock, maxlen, json)
    if type(id) == 'table' then
      problems[#problems + 1] = 'rejected ' .. log .. ': ' .. id.err
    else
      if minid then redis.pcall('XTRIM', log, 'MINID', '~', minid) end
      local ok = redis.pcall('HSET', latest, tag, json)
      if type(ok) == 'table' then problems[#problems + 1] = 'latest not kept ' .. latest .. ': ' .. ok.err end
      ok = redis.pcall('SADD', wells, well)
      if type(ok) == 'table' then problems[#problems + 1] = 'not registered ' .. wells .. ': ' .. ok.err end
      issued[clock] = id
      redis.call('SPUBLISH', channel, id .. ' ' .. json)
      ids[i + 1] = id
    end
    if seq > top then top = seq end
  end
end
for clock, id in pairs(issued) do redis.call('SET', clock, id) end
if producer and top > applied then redis.call('SET', producer, top, 'EX', 2592000) end
return {ids, problems}
