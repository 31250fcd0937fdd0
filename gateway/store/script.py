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
what each call costs (``python -m bench.ratelimit --script``).

``KEYS``: one per counter, the groups' counters one after the other. ``ARGV``: ``mode``
(``hit`` or ``add``), ``now`` in ms (empty: ``TIME``), the number of groups, each group's
number of counters, then per counter ``limit, period_ms, amount, fixed(0|1)``. ``hit``
returns, per group, ``admitted, failed index (1-based, 0 = none), remaining1, reset_ms1,
...`` one group after the other; ``add`` adds every amount unconditionally (negative: a
refund) and returns 1.
"""

from __future__ import annotations

LIMIT_SCRIPT = """
local function fdiv(x, d)
  local r = math.fmod(x, d)
  local q = (x - r) / d
  if r < 0 then q = q - 1 end
  return q
end
local function first_fit(period, prev, need)
  return math.min(period, period + fdiv(-(need + 1) * period, prev) + 1)
end
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + fdiv(tonumber(t[2]), 1000)
end
local groups = tonumber(ARGV[3])
-- per key, as read and as counted so far: window, current, previous; rolled, dirty, spec
local sw, sc, sp, rolled, dirty, sper, sela, sfix = {}, {}, {}, {}, {}, {}, {}, {}
local order = {}
-- the groups repeat the same few numbers, and tonumber (strtod) is a good part of a call:
-- each string is converted once a call
local num = {}
-- per counter (index k over the whole call)
local lim, per, amt, fix, ela, c0, p0 = {}, {}, {}, {}, {}, {}, {}
local elapsed = {}  -- ms into the current window, per period
local out = {}
local k = 0
local b = 3 + groups
for g = 1, groups do
  local n = tonumber(ARGV[3 + g])
  local first = k + 1
  for i = first, first + n - 1 do
    local name = KEYS[i]
    local x = ARGV[b + 1]
    local v = num[x]
    if v == nil then v = tonumber(x) num[x] = v end
    lim[i] = v
    x = ARGV[b + 2]
    local pd = num[x]
    if pd == nil then pd = tonumber(x) num[x] = pd end
    per[i] = pd
    x = ARGV[b + 3]
    v = num[x]
    if v == nil then v = tonumber(x) num[x] = v end
    amt[i] = v
    local fx = ARGV[b + 4] == '1'
    fix[i] = fx
    b = b + 4
    local e = elapsed[pd]
    if not e then
      e = math.fmod(now, pd)
      elapsed[pd] = e
    end
    ela[i] = e
    if sw[name] == nil then
      local win = (now - e) / pd
      local s = redis.call('HMGET', name, 'w', 'c', 'p')
      local w, c, p = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
      if w ~= win then
        if w == win - 1 and not fx then p = c else p = 0 end
        c = 0
        rolled[name] = true
      end
      sw[name], sc[name], sp[name] = win, c, p
      sper[name], sela[name], sfix[name] = pd, e, fx
      order[#order + 1] = name
    end
    -- the group's checks all see the state before the group (a key twice is one counter)
    c0[i], p0[i] = sc[name], sp[name]
  end
  k = first + n - 1
  local failed = 0
  if mode == 'hit' then
    for i = first, k do
      local w = c0[i]
      if not fix[i] then w = fdiv(p0[i] * (per[i] - ela[i]), per[i]) + w end
      if w + amt[i] > lim[i] then
        failed = i - first + 1
        break
      end
    end
  end
  if failed == 0 then
    for i = first, k do
      if amt[i] ~= 0 then
        local name = KEYS[i]
        local c, p = sc[name] + amt[i], sp[name]
        if c < 0 then
          p = math.max(0, p + c)
          c = 0
        end
        sc[name], sp[name], dirty[name] = c, p, true
      end
    end
  end
  if mode == 'hit' then
    out[#out + 1] = failed == 0 and 1 or 0
    out[#out + 1] = failed
    for i = first, k do
      local name = KEYS[i]
      local c, p = sc[name], sp[name]
      local w = c
      if not fix[i] then w = fdiv(p * (per[i] - ela[i]), per[i]) + c end
      local left = lim[i] - w
      local need = 1
      if i - first + 1 == failed then need = amt[i] end
      out[#out + 1] = math.max(0, left)
      local reset = per[i] - ela[i]
      if not fix[i] and left < need then
        local room = lim[i] - need - c
        if room >= 0 then
          if p > room then reset = math.max(0, first_fit(per[i], p, room) - ela[i])
          else reset = 0 end
        elseif lim[i] - need >= 0 and c > lim[i] - need then
          reset = reset + first_fit(per[i], c, lim[i] - need)
        end
      end
      out[#out + 1] = reset
    end
  end
end
for _, name in ipairs(order) do
  if dirty[name] then
    redis.call('HSET', name, 'w', sw[name], 'c', sc[name], 'p', sp[name])
    if rolled[name] then
      if sfix[name] then
        redis.call('PEXPIRE', name, sper[name] - sela[name] + 60000)
      else
        redis.call('PEXPIRE', name, 2 * sper[name])
      end
    end
  end
end
if mode ~= 'hit' then return 1 end
return out
"""
