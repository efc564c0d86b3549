-- A stream's bookkeeping and a page of entries (and its latest hash) in one atomic step.
-- Trimming does not update max-deleted-entry-id, so truncation is inferred from entries-added vs length.
-- KEYS: log, [latest]. ARGV: first id to read ('' = none), count.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0', '0-0', 0, 0, {}, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local state = {}
for i = 1, #info, 2 do state[info[i]] = info[i + 1] end
local first = '0-0'
if state['first-entry'] then first = state['first-entry'][1] end
local entries = {}
if ARGV[1] ~= '' then entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2]) end
local latest = {}
if KEYS[2] then latest = redis.call('HGETALL', KEYS[2]) end
return {state['last-generated-id'], first, state['length'], state['entries-added'], entries, latest}
