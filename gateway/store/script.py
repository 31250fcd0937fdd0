"""The Lua script that checks and counts a whole batch in Redis in one round trip.

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

``KEYS``: one per counter. ``ARGV``: ``mode`` (``hit`` or ``add``), ``now`` in ms (empty:
``TIME``), then per counter ``limit, period_ms, amount, fixed(0|1)``. ``hit`` returns
``{admitted, failed index (1-based, 0 = none), remaining1, reset_ms1, ...}``; ``add`` adds
every amount unconditionally (negative: a refund) and returns 1.
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
local n = #KEYS
local lim, per, amt, fix, win, ela, cur, prv = {}, {}, {}, {}, {}, {}, {}, {}
local at, first, dirty, rolled = {}, {}, {}, {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  lim[i] = tonumber(ARGV[b + 1])
  per[i] = tonumber(ARGV[b + 2])
  amt[i] = tonumber(ARGV[b + 3])
  fix[i] = ARGV[b + 4] == '1'
  ela[i] = math.fmod(now, per[i])
  win[i] = (now - ela[i]) / per[i]
  at[i] = first[KEYS[i]] or i
  if at[i] == i then
    first[KEYS[i]] = i
    local s = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
    local w, c, p = tonumber(s[1]), tonumber(s[2]) or 0, tonumber(s[3]) or 0
    if w ~= win[i] then
      if w == win[i] - 1 and not fix[i] then p = c else p = 0 end
      c = 0
      rolled[i] = true
    end
    cur[i], prv[i] = c, p
  end
end
local function weighted(i)
  local a = at[i]
  if fix[i] then return cur[a] end
  return fdiv(prv[a] * (per[i] - ela[i]), per[i]) + cur[a]
end
local failed = 0
if mode == 'hit' then
  for i = 1, n do
    if weighted(i) + amt[i] > lim[i] then
      failed = i
      break
    end
  end
end
if failed == 0 then
  for i = 1, n do
    if amt[i] ~= 0 then
      local a = at[i]
      local c, p = cur[a] + amt[i], prv[a]
      if c < 0 then
        p = math.max(0, p + c)
        c = 0
      end
      cur[a], prv[a], dirty[a] = c, p, true
    end
  end
  for i = 1, n do
    if dirty[i] then
      redis.call('HSET', KEYS[i], 'w', win[i], 'c', cur[i], 'p', prv[i])
      if not rolled[i] then
        -- same window as the stored one: its expiry, set when the window began, still holds
      elseif fix[i] then
        redis.call('PEXPIRE', KEYS[i], per[i] - ela[i] + 60000)
      else
        redis.call('PEXPIRE', KEYS[i], 2 * per[i])
      end
    end
  end
end
if mode ~= 'hit' then return 1 end
local out = {failed == 0 and 1 or 0, failed}
for i = 1, n do
  local left = lim[i] - weighted(i)
  local need = 1
  if i == failed then need = amt[i] end
  out[#out + 1] = math.max(0, left)
  local reset, c, p = per[i] - ela[i], cur[at[i]], prv[at[i]]
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
return out
"""
