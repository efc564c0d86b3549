-- The tags of every worker whose lease ran out: each one whose latest reading is neither BAD nor
-- already stale gets a reading in its well's log saying so (quality UNCERTAIN, reason stale,
-- its last value and timestamp), exactly as if its worker had published it; then the worker is
-- forgotten, so this happens once. Nothing else is read or written.
-- KEYS: the tenant's workers sorted set, its clock. ARGV: tenant key prefix, live channel, maxlen, age_ms.
-- clock.lua comes first: now, advance(), append().
local workers, clock = KEYS[1], KEYS[2]
local prefix, channel, maxlen, age_ms = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local minid = nil
if age_ms > 0 then minid = string.format('%d-0', now - age_ms) end
local marked, last = 0, nil
for _, worker in ipairs(redis.call('ZRANGEBYSCORE', workers, '-inf', now)) do
  local mine = prefix .. 'worker:' .. worker
  for _, member in ipairs(redis.call('SMEMBERS', mine)) do
    local slash = string.find(member, '/', 1, true)
    local well, tag = string.sub(member, 1, slash - 1), string.sub(member, slash + 1)
    local latest, log = prefix .. 'latest:' .. well, prefix .. 'log:' .. well
    local json = redis.call('HGET', latest, tag)
    -- The JSON is ours (Reading.to_json): "quality" and "reason" appear once, as keys; a quote
    -- inside a string value is escaped, so these patterns cannot match inside one.
    if json and not string.find(json, '"quality":"BAD"', 1, true) and not string.find(json, '"reason":"stale"', 1, true) then
      local stale = string.gsub(json, '"quality":"%u+"', '"quality":"UNCERTAIN"', 1)
      stale = string.gsub(stale, ',"reason":"[%l_]+"', '', 1)
      stale = string.gsub(stale, ',"statusCode":"[%w_]+"', '', 1)
      stale = string.sub(stale, 1, -2) .. ',"reason":"stale"}'
      local id = append(log, clock, maxlen, stale)
      if type(id) ~= 'table' then
        if minid then redis.pcall('XTRIM', log, 'MINID', '~', minid) end
        redis.call('HSET', latest, tag, stale)
        redis.call('SPUBLISH', channel, id .. ' ' .. stale)
        marked, last = marked + 1, id
      end
    end
  end
  redis.call('DEL', mine)
  redis.call('ZREM', workers, worker)
end
if last then redis.call('SET', clock, last) end
return marked
