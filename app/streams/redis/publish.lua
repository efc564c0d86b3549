-- One batch of readings: XADD + XTRIM + HSET + SADD + PUBLISH per reading, and the producer's
-- highest applied seq, in one atomic step (history and live never disagree).
-- ARGV: maxlen, age_ms, producer ('' = no dedupe), then per reading: well, tag, channel, json, seq.
-- KEYS: per reading log, latest, wells; then the producer's key when there is a producer.
local maxlen, age_ms = ARGV[1], tonumber(ARGV[2])
local minid = nil
if age_ms > 0 then
  local t = redis.call('TIME')
  minid = (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - age_ms) .. '-0'
end
local n = #KEYS
local producer, applied = nil, -1
if ARGV[3] ~= '' then
  producer = KEYS[n]
  n = n - 1
  applied = tonumber(redis.call('GET', producer) or '-1')
end
local top = applied
local ids, problems = {}, {}
for i = 0, (n / 3) - 1 do
  local seq = tonumber(ARGV[5 * i + 8])
  if producer == nil or seq > applied then
    local log, latest, wells = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
    local well, tag, channel, json = ARGV[5 * i + 4], ARGV[5 * i + 5], ARGV[5 * i + 6], ARGV[5 * i + 7]
    -- pcall: a key of the wrong type (written by something else) must not abort the script
    -- half-way, which would leave the batch half-applied and make every retry repeat that half.
    local id = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, '*', 'r', json)
    if type(id) == 'table' then
      problems[#problems + 1] = 'rejected ' .. log .. ': ' .. id.err
    else
      if minid then redis.pcall('XTRIM', log, 'MINID', '~', minid) end
      local ok = redis.pcall('HSET', latest, tag, json)
      if type(ok) == 'table' then problems[#problems + 1] = 'latest not kept ' .. latest .. ': ' .. ok.err end
      ok = redis.pcall('SADD', wells, well)
      if type(ok) == 'table' then problems[#problems + 1] = 'not registered ' .. wells .. ': ' .. ok.err end
      redis.call('PUBLISH', channel, id .. ' ' .. json)
      ids[#ids + 1] = id
    end
    if seq > top then top = seq end
  end
end
if producer and top > applied then redis.call('SET', producer, top, 'EX', 2592000) end
return {ids, problems}
