"""The Lua script that checks and counts many requests' batches in Redis in one round trip.

It is :class:`gateway.store.memory.MemoryStore` in Lua (same windows, same integer
arithmetic, same answers; a test runs both side by side). The clock is Redis' own ``TIME``,
so every gateway replica sees the same window edges whatever its own clock says; tests may
pass ``now`` instead. Each counter is one hash ``{w, c, p}`` (window index, current and
previous count). Its expiry is set by the first write of each window: two periods later
for a sliding window (so it outlives the next window, which reads it as the previous one),
one minute after the window's end for a fixed one; later writes in the same window leave it
(one ``PEXPIRE`` a window instead of one a request). Likewise a write sets ``c`` alone unless
the window rolled or a refund reached into the previous count: ``string.format`` is a good
part of a lone call (Redis instructions a lone request of ``bench.speed``'s four counters,
``python -m bench.ratelimit --script --callgrind``: 278k -> 257k). A key given twice in one
batch is one counter (as in memory). Integer division is done with ``math.fmod`` so it stays
exact in Lua's doubles below 2^53.

One call carries several *groups*, each the batch of one request, decided in order as if
each were its own call (a group sees what the groups before it counted). A key is read once
and written once a call, however many groups touch it: under load most requests of a loop
turn share their ip, user and route keys, and Redis' Lua interpreter, not the counting, is
what each call costs (``python -m bench.ratelimit --script``). So the script keeps a key's
state in one record made whole at once, and each slot's (below) in another, rather than a
table per field that grows a key at a time; it calls no helper function on the common path
(a key's read and roll, and the sliding weight, are written out in each path that needs
them; ``reset_at`` runs only near a limit); and it writes counts with ``%d`` rather than
Lua's ``%.14g`` (a float formatter): 17% fewer instructions for a lone request than the
table-per-field version (callgrind, ``--script --callgrind``).

``KEYS``: one per *slot*, a counter (key and window) the call holds, each sent once however
many groups count in it. ``ARGV``: ``mode`` (``hit`` or ``add``), ``now`` in ms (empty:
``TIME``), the number of slots, the number of groups, per slot ``limit, period_ms`` (a fixed
window's period negated), each group's number of counters, then per counter ``slot
(1-based), amount``. A key's state is read once a call whatever its slots, and a sliding
window's weight of the previous count is computed once a slot, not per counter of each group
(callgrind, eight requests a call: 94k -> 72k instructions a request; a lone request 264k ->
279k, for the slot records). ``hit`` returns, per group, ``admitted, failed index (1-based, 0
= none), remaining1, reset_ms1, ...`` one group after the other; ``add`` adds every amount
unconditionally (negative: a refund) and returns 1.

``one`` is ``hit`` for a call that carries one request whose counters each have their own key
(every request at a low rate, and most lone ones under load): ``ARGV`` is ``one``, ``now``,
the number of counters, then per counter ``limit, period_ms, amount`` (``KEYS`` in the same
order); the reply is that of ``hit`` for one group. It skips the key and slot records, the
shared-number cache and the refund arithmetic (its amounts are never negative), and reads
its arguments once: Redis instructions a lone request of ``bench.speed``'s four counters
(``python -m bench.ratelimit --script --callgrind``, same sitting): 257,572 -> 200,587;
202,802 since both paths share ``reset_at`` (a closure made each call). Of what is left,
``strtod`` (``tonumber`` of the arguments and of the stored counts) is ~15%.
"""

from __future__ import annotations

LIMIT_SCRIPT = """
local fmod, min, max, tonumber, fmt = math.fmod, math.min, math.max, tonumber, string.format
-- when a sliding counter without room for `need` has it again (ms from now): once the
-- previous window's weight has decayed enough (first fit), or else the current count's;
-- only asked near a limit, so a function call costs nothing on the common path
local function reset_at(lim, need, pd, e, c, p)
  local room = lim - need - c
  if room >= 0 then
    if p > room then
      local y = -(room + 1) * pd
      local m = fmod(y, p)
      local f = (y - m) / p
      if m < 0 then f = f - 1 end
      return max(0, min(pd, pd + f + 1) - e)
    end
    return 0
  elseif lim - need >= 0 and c > lim - need then
    local y = -(lim - need + 1) * pd
    local m = fmod(y, c)
    local f = (y - m) / c
    if m < 0 then f = f - 1 end
    return pd - e + min(pd, pd + f + 1)
  end
  return pd - e
end
local mode = ARGV[1]
local hit = mode == 'hit'
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  local r = fmod(us, 1000)
  now = tonumber(t[1]) * 1000 + (us - r) / 1000
end
if mode == 'one' then
  -- one request whose counters all have their own key: no record per key or slot, no
  -- shared-number cache; per counter its arguments and the state before the request
  -- (limit, period, amount, elapsed, c, p, q, rolled) in one table sized for four
  local n = tonumber(ARGV[3])
  local t = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
  local failed = 0
  local b = 3
  for i = 1, n do
    local lim, sp, amt = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
    b = b + 3
    local fx = sp < 0
    local pd = sp
    if fx then pd = -sp end
    local e = fmod(now, pd)
    local win = (now - e) / pd
    local s = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local w, c, p = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
    local rolled = false
    if w ~= win then
      if w == win - 1 and not fx then p = c else p = 0 end
      c = 0
      rolled = true
    end
    local q = 0
    if not fx then
      local y = p * (pd - e)
      local m = fmod(y, pd)
      q = (y - m) / pd
      if m < 0 then q = q - 1 end
    end
    if failed == 0 and q + c + amt > lim then failed = i end
    local o = 8 * i
    t[o - 7], t[o - 6], t[o - 5], t[o - 4] = lim, sp, amt, e
    t[o - 3], t[o - 2], t[o - 1], t[o] = c, p, q, rolled
  end
  local out = {failed == 0 and 1 or 0, failed, 0, 0, 0, 0, 0, 0, 0, 0}
  for i = 1, n do
    local o = 8 * i
    local lim, pd, amt, e = t[o - 7], t[o - 6], t[o - 5], t[o - 4]
    local c, p, q, rolled = t[o - 3], t[o - 2], t[o - 1], t[o]
    local fx = pd < 0
    if fx then pd = -pd end
    if failed == 0 and amt ~= 0 then
      local name = KEYS[i]
      c = c + amt
      if not rolled then
        redis.call('HSET', name, 'c', fmt('%d', c))
      else
        local win = fmt('%d', (now - e) / pd)
        redis.call('HSET', name, 'w', win, 'c', fmt('%d', c), 'p', fmt('%d', p))
        if fx then
          redis.call('PEXPIRE', name, pd - e + 60000)
        else
          redis.call('PEXPIRE', name, 2 * pd)
        end
      end
    end
    local left = lim - c
    if not fx then left = lim - (q + c) end
    local need = 1
    if i == failed then need = amt end
    local reset = pd - e
    if not fx and left < need then reset = reset_at(lim, need, pd, e, c, p) end
    out[2 * i + 1] = max(0, left)
    out[2 * i + 2] = reset
  end
  for k = 2 * n + 3, 10 do out[k] = nil end  -- Redis replies up to the first nil
  return out
end
local slots = tonumber(ARGV[3])
local groups = tonumber(ARGV[4])
-- per key, in a record made whole at once (array part, no rehash):
-- {window, current, previous, period, elapsed, fixed, rolled, dirty, key, previous changed}
local state, order = {}, {}
-- per slot, a record made whole at once: {limit, period, fixed, elapsed, key state, p, w}
-- where w = floor(p * (period - elapsed) / period), the previous window's weight, kept
-- with the p it was computed for
local sr = {}
local b = 4
for i = 1, slots do
  local lim, pd = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local fx = pd < 0
  if fx then pd = -pd end
  b = b + 2
  local e = fmod(now, pd)
  local name = KEYS[i]
  local st = state[name]
  if st == nil then
    local win = (now - e) / pd
    local s = redis.call('HMGET', name, 'w', 'c', 'p')
    local w, c, p = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
    local rolled = false
    if w ~= win then
      if w == win - 1 and not fx then p = c else p = 0 end
      c = 0
      rolled = true
    end
    st = {win, c, p, pd, e, fx, rolled, false, name, false}
    state[name] = st
    order[#order + 1] = st
  end
  sr[i] = {lim, pd, fx, e, st, false, 0}
end
-- each distinct number string converted once a call (strtod is a good part of a call)
local num = {}
-- per counter of the current group: its slot's record and its amount (sized for 8)
local gs, ga = {0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 0, 0}
local out = {}
local pos = b + groups
for g = 1, groups do
  local n = tonumber(ARGV[b + g])
  for j = 1, n do
    local x = ARGV[pos + 1]
    local i = num[x]
    if i == nil then i = tonumber(x) num[x] = i end
    x = ARGV[pos + 2]
    local amt = num[x]
    if amt == nil then amt = tonumber(x) num[x] = amt end
    gs[j], ga[j] = sr[i], amt
    pos = pos + 2
  end
  -- the checks all see the state before the group (a key twice is one counter): nothing
  -- is counted until every check passed
  local failed = 0
  if hit then
    for j = 1, n do
      local r = gs[j]
      local st = r[5]
      local w = st[2]
      if not r[3] then
        local p = st[3]
        local q = r[7]
        if r[6] ~= p then
          local pd = r[2]
          local y = p * (pd - r[4])
          local m = fmod(y, pd)
          q = (y - m) / pd
          if m < 0 then q = q - 1 end
          r[6], r[7] = p, q
        end
        w = q + w
      end
      if w + ga[j] > r[1] then
        failed = j
        break
      end
    end
  end
  if failed == 0 then
    for j = 1, n do
      local amt = ga[j]
      if amt ~= 0 then
        local st = gs[j][5]
        local cur, p = st[2] + amt, st[3]
        if cur < 0 then
          p = max(0, p + cur)
          cur = 0
          st[10] = true
        end
        st[2], st[3], st[8] = cur, p, true
      end
    end
  end
  if hit then
    local o = #out
    out[o + 1] = failed == 0 and 1 or 0
    out[o + 2] = failed
    o = o + 2
    for j = 1, n do
      local r = gs[j]
      local lim, pd, fx, e, st = r[1], r[2], r[3], r[4], r[5]
      local c, p = st[2], st[3]
      local w = c
      if not fx then
        local q = r[7]
        if r[6] ~= p then
          local y = p * (pd - e)
          local m = fmod(y, pd)
          q = (y - m) / pd
          if m < 0 then q = q - 1 end
          r[6], r[7] = p, q
        end
        w = q + c
      end
      local left = lim - w
      local need = 1
      if j == failed then need = ga[j] end
      local reset = pd - e
      if not fx and left < need then reset = reset_at(lim, need, pd, e, c, p) end
      out[o + 1] = max(0, left)
      out[o + 2] = reset
      o = o + 2
    end
  end
end
for i = 1, #order do
  local st = order[i]
  if st[8] then
    local name = st[9]
    if st[7] or st[10] then
      redis.call('HSET', name, 'w', fmt('%d', st[1]), 'c', fmt('%d', st[2]), 'p', fmt('%d', st[3]))
    else
      redis.call('HSET', name, 'c', fmt('%d', st[2]))
    end
    if st[7] then
      if st[6] then
        redis.call('PEXPIRE', name, st[4] - st[5] + 60000)
      else
        redis.call('PEXPIRE', name, 2 * st[4])
      end
    end
  end
end
if not hit then return 1 end
return out
"""
