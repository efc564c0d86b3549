-- Several wells of one tenant in one atomic step, at the tenant's clock.
-- KEYS: the tenant's clock, its wells set. ARGV: key prefix 'scada:{t}:', after ('' = a snapshot),
-- count, then the wells (none: every well in the set).
-- Returns {clock, {well, truncated, complete, entries, latest}...}: entries after `after` up to the
-- clock (at most `count`); latest for a snapshot and for a truncated well, else empty.
-- Trimming does not update max-deleted-entry-id, so truncation is inferred from entries-added
-- vs length: some entry newer than `after` may be gone when the log was ever trimmed, `after` is
-- older than its first entry (or it is empty) and older than its last.
local prefix, after, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local clock = redis.call('GET', KEYS[1]) or '0-0'

-- Ids compare as two decimal numbers; as strings (no leading zeros), so any 64-bit id is exact.
local function part_cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function id_cmp(a, b)
  local da, db = string.find(a, '-', 1, true), string.find(b, '-', 1, true)
  local c = part_cmp(string.sub(a, 1, da - 1), string.sub(b, 1, db - 1))
  if c ~= 0 then return c end
  return part_cmp(string.sub(a, da + 1), string.sub(b, db + 1))
end

local function trimmed_past(log)
  if redis.call('EXISTS', log) == 0 then return false end
  local info = redis.call('XINFO', 'STREAM', log)
  local state = {}
  for i = 1, #info, 2 do state[info[i]] = info[i + 1] end
  local first = '0-0'
  if state['first-entry'] then first = state['first-entry'][1] end
  local trimmed = tonumber(state['entries-added']) > tonumber(state['length'])
  return trimmed and (id_cmp(after, first) < 0 or tonumber(state['length']) == 0)
    and id_cmp(after, state['last-generated-id']) < 0
end

local wells = {}
if #ARGV > 3 then
  for i = 4, #ARGV do wells[#wells + 1] = ARGV[i] end
else
  wells = redis.call('SMEMBERS', KEYS[2])
end
local unknown = after ~= '' and id_cmp(after, clock) > 0  -- never issued: every well starts over
local out = {clock}
for _, well in ipairs(wells) do
  local log, latest = prefix .. 'log:' .. well, prefix .. 'latest:' .. well
  if after == '' then
    out[#out + 1] = {well, 0, 1, {}, redis.call('HGETALL', latest)}
  else
    local truncated = unknown or trimmed_past(log)
    local entries = {}
    if not truncated then entries = redis.call('XRANGE', log, '(' .. after, clock, 'COUNT', count) end
    local values = {}
    if truncated then values = redis.call('HGETALL', latest) end
    out[#out + 1] = {well, truncated and 1 or 0, #entries < count and 1 or 0, entries, values}
  end
end
return out
