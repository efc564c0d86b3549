-- A follow-up read of one well: its bookkeeping and the entries in (after, upto], in one step.
-- KEYS: log. ARGV: after, upto, count. Returns {last-generated-id, first id, length, entries-added, entries}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0', '0-0', 0, 0, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local state = {}
for i = 1, #info, 2 do state[info[i]] = info[i + 1] end
local first = '0-0'
if state['first-entry'] then first = state['first-entry'][1] end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], ARGV[2], 'COUNT', ARGV[3])
return {state['last-generated-id'], first, state['length'], state['entries-added'], entries}
