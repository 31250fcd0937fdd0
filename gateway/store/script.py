"""The Lua script that checks and counts many requests' batches in Redis in one round trip.

It is :class:`gateway.store.memory.MemoryStore` in Lua (same windows, same integer
arithmetic, same answers; a test runs both side by side). The clock is Redis' own ``TIME``,
so every gateway replica sees the same window edges whatever its own clock says; tests may
pass ``now`` instead. Each counter is one hash ``{w, c, p}`` (window index, current and
previous count). Its expiry is set by the first write of each window: two periods later
for a sliding window (so it outlives the next window, which reads it as the previous one),
one minute after the window's end for a fixed one; later writes in the same window leave it
(one ``PEXPIRE`` a window instead of one a request). A key given twice in one batch is one
counter (as in memory). Integer division is done with ``math.fmod`` so it stays exact in
Lua's doubles below 2^53.

One call carries several *groups*, each the batch of one request, decided in order as if
each were its own call (a group sees what the groups before it counted). A key is read once
and written once a call, however many groups touch it: under load most requests of a loop
turn share their ip, user and route keys, and Redis' Lua interpreter, not the counting, is
what each call costs (``python -m bench.ratelimit --script``). So the script keeps a key's
state in one record made whole at once, and each counter of a group in another, rather than
a table per field that grows a key at a time; it calls no helper functions; and it writes
counts with ``%d`` rather than Lua's ``%.14g`` (a float formatter): 17% fewer instructions
for a lone request than the table-per-field version (callgrind, ``--script --callgrind``).

``KEYS``: one per counter, the groups' counters one after the other. ``ARGV``: ``mode``
(``hit`` or ``add``), ``now`` in ms (empty: ``TIME``), the number of groups, each group's
number of counters, then per counter ``limit, period_ms, amount, fixed(0|1)``. ``hit``
returns, per group, ``admitted, failed index (1-based, 0 = none), remaining1, reset_ms1,
...`` one group after the other; ``add`` adds every amount unconditionally (negative: a
refund) and returns 1.
"""

from __future__ import annotations

LIMIT_SCRIPT = """
local fmod, min, max, tonumber, fmt = math.fmod, math.min, math.max, tonumber, string.format
local mode = ARGV[1]
local hit = mode == 'hit'
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  local r = fmod(us, 1000)
  now = tonumber(t[1]) * 1000 + (us - r) / 1000
end
local groups = tonumber(ARGV[3])
-- per key, in a record made whole at once (array part, no rehash):
-- {window, current, previous, period, elapsed, fixed, rolled, dirty, key}
local state, order = {}, {}
-- each distinct number string converted once a call (strtod is a good part of a call)
local num = {}
-- per counter of the current group: {limit, period, amount, fixed, elapsed, c0, p0, key}
local cs = {}
local out = {}
local k = 0
local b = 3 + groups
for g = 1, groups do
  local n = tonumber(ARGV[3 + g])
  for j = 1, n do
    local name = KEYS[k + j]
    local x = ARGV[b + 1]
    local lim = num[x]
    if lim == nil then lim = tonumber(x) num[x] = lim end
    x = ARGV[b + 2]
    local pd = num[x]
    if pd == nil then pd = tonumber(x) num[x] = pd end
    x = ARGV[b + 3]
    local amt = num[x]
    if amt == nil then amt = tonumber(x) num[x] = amt end
    local fx = ARGV[b + 4] == '1'
    b = b + 4
    local e = fmod(now, pd)
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
      st = {win, c, p, pd, e, fx, rolled, false, name}
      state[name] = st
      order[#order + 1] = st
    end
    -- the group's checks all see the state before the group (a key twice is one counter)
    cs[j] = {lim, pd, amt, fx, e, st[2], st[3], st}
  end
  k = k + n
  local failed = 0
  if hit then
    for j = 1, n do
      local c = cs[j]
      local w = c[6]
      if not c[4] then
        local pd = c[2]
        local y = c[7] * (pd - c[5])
        local r = fmod(y, pd)
        local q = (y - r) / pd
        if r < 0 then q = q - 1 end
        w = q + w
      end
      if w + c[3] > c[1] then
        failed = j
        break
      end
    end
  end
  if failed == 0 then
    for j = 1, n do
      local c = cs[j]
      local amt = c[3]
      if amt ~= 0 then
        local st = c[8]
        local cur, p = st[2] + amt, st[3]
        if cur < 0 then
          p = max(0, p + cur)
          cur = 0
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
      local cj = cs[j]
      local lim, pd, e, st = cj[1], cj[2], cj[5], cj[8]
      local c, p = st[2], st[3]
      local fx = cj[4]
      local w = c
      if not fx then
        local y = p * (pd - e)
        local r = fmod(y, pd)
        local q = (y - r) / pd
        if r < 0 then q = q - 1 end
        w = q + c
      end
      local left = lim - w
      local need = 1
      if j == failed then need = cj[3] end
      local reset = pd - e
      if not fx and left < need then
        local room = lim - need - c
        if room >= 0 then
          if p > room then
            -- first_fit(pd, p, room)
            local y = -(room + 1) * pd
            local r = fmod(y, p)
            local q = (y - r) / p
            if r < 0 then q = q - 1 end
            reset = max(0, min(pd, pd + q + 1) - e)
          else
            reset = 0
          end
        elseif lim - need >= 0 and c > lim - need then
          local y = -(lim - need + 1) * pd
          local r = fmod(y, c)
          local q = (y - r) / c
          if r < 0 then q = q - 1 end
          reset = reset + min(pd, pd + q + 1)
        end
      end
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
    redis.call('HSET', name, 'w', fmt('%d', st[1]), 'c', fmt('%d', st[2]), 'p', fmt('%d', st[3]))
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
