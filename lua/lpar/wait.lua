--- Waiting on the shared luv loop.
-- Waiting runs luv's loop, so the user's luv timers and sockets keep being
-- served while a result is awaited. uv.run is not re-entrant: inside a luv
-- callback a wait can only yield (when called from a coroutine) or fail
-- with a clear message.
local uv = require "luv"
local core = require "lpar.core"

local wait = {}

-- Timers are pooled and never closed: luv 1.44 (Debian's) crashes at exit
-- when a handle was closed and the loop did not run again before the
-- process ended. Pooled timers are unref'd, so they keep no loop alive.
local idle_timers = {}

local function acquire_timer(seconds, fn)
  local t = table.remove(idle_timers)
  if not t then
    t = uv.new_timer()
    t:unref()
  end
  t:start(math.max(0, math.floor(seconds * 1000)), 0, fn)
  return t
end

local function release_timer(t)
  t:stop()
  idle_timers[#idle_timers + 1] = t
end

wait.acquire_timer, wait.release_timer = acquire_timer, release_timer

local function wait_in_coroutine(done, timeout, subscribe)
  local co = coroutine.running()
  local timer, woken = nil, false
  local function wake()
    if woken then return end
    woken = true
    if timer then release_timer(timer) end
    local ok, err = coroutine.resume(co)
    if not ok then io.stderr:write("lpar: error in a waiting coroutine: ", tostring(err), "\n") end
  end
  subscribe(wake)
  if timeout then timer = acquire_timer(timeout, wake) end
  coroutine.yield()
  return done()
end

--- Run the loop until done() is true or `timeout` seconds pass.
-- `subscribe(fn)` registers fn to be called when done() may have changed;
-- it is only needed to wait from a coroutine inside a luv callback.
-- Returns done().
function wait.until_done(done, timeout, subscribe, level)
  if done() then return true end
  if timeout and timeout <= 0 then return false end
  if core.loop_running() then
    local _, main = coroutine.running()
    if not main and coroutine.isyieldable() and subscribe then
      return wait_in_coroutine(done, timeout, subscribe)
    end
    error("cannot wait for a result inside a luv callback (uv.run is not re-entrant): "
      .. "check ar:ready(), or wait from a coroutine", (level or 1) + 1)
  end
  local timer, expired = nil, false
  if timeout then timer = acquire_timer(timeout, function() expired = true end) end
  while not done() and not expired do
    if not uv.run("once") and not done() then
      -- The loop has nothing left that could finish this wait.
      break
    end
  end
  if timer then release_timer(timer) end
  return done()
end

return wait
