-- The tenant id clock, shared by the scripts that append to a tenant's logs (prepended to them).
-- `now` is Redis's own time in ms; `advance(clock_key, floor)` issues the next id of that
-- clock (past `floor` when given); `append(log, clock, maxlen, json)` XADDs one entry with the
-- next id, moving a clock that fell behind its log past it, and returns the id or an error reply.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

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

local function append(log, clock, maxlen, json)
  local id = advance(clock)
  -- pcall: a key of the wrong type (written by something else) must not abort the script
  -- half-way, which would leave the batch half-applied and make every retry repeat that half.
  local added = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, id, 'r', json)
  if type(added) == 'table' and string.find(added.err, 'equal or smaller', 1, true) then
    -- The clock is behind this log (it was lost, or the log predates it): move it past.
    id = advance(clock, last_generated(log))
    added = redis.pcall('XADD', log, 'MAXLEN', '~', maxlen, id, 'r', json)
  end
  if type(added) == 'table' then return added end
  return id
end
