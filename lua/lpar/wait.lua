--- Waiting on the shared luv loop.
-- Waiting runs luv's loop, so the user's luv timers and sockets keep being
-- served while a result is awaited. uv.run is not re-entrant: inside a luv
-- callback a wait can only yield (when called from a coroutine) or fail
-- with a clear message.
local uv = require "luv"
local core = require "lpar.core"

local wait = {}

-- Ctrl-C (the prompt's SIGINT handler calls wait.interrupt) during a wait
-- on the main thread: the first interrupts the tasks waited for and gives
-- them a moment to answer "interrupted"; a second, or no answer, ends the
-- wait with an "interrupted" error.
local INTERRUPT_GRACE = 1
local interrupt_requested, main_waits = false, 0

--- Is a wait running the loop on the main thread now?
function wait.waiting() return main_waits > 0 end

--- End (or begin to end) the wait running now; for a signal handler.
function wait.interrupt()
  interrupt_requested = true
  uv.stop()
end

local function interrupted_error(level)
  error(setmetatable({ reason = "interrupted",
    message = "interrupted: Ctrl-C ended the wait (the call's tasks were interrupted)" },
    { __tostring = function(e) return "KeyboardInterrupt: " .. e.message end }), level + 1)
end

-- Timers are pooled and never closed: luv 1.44 (Debian's) crashes at exit
-- when a handle was closed and the loop did not run again before the
-- process ended. Pooled timers are unref'd, so they keep no loop alive.
local idle_timers = {}

--- A timer calling fn once after `seconds`, from now: libuv caches the
-- loop's time, which is stale after the client ran Lua code, so it is
-- brought up to date first. `keep_alive`: the timer holds the loop open
-- (a bounded wait must not end early because nothing else is left).
local function acquire_timer(seconds, fn, keep_alive)
  local t = table.remove(idle_timers)
  if not t then
    t = uv.new_timer()
    t:unref()
  end
  if keep_alive then t:ref() end
  uv.update_time()
  t:start(math.max(0, math.ceil(seconds * 1000)), 0, fn)
  return t
end

local function release_timer(t)
  t:stop()
  t:unref()
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
-- `on_interrupt()` stops what is waited for, on Ctrl-C (see wait.interrupt).
-- Returns done(), and true as a second value when the wait ended because
-- nothing left on the loop could finish it.
function wait.until_done(done, timeout, subscribe, level, on_interrupt)
  if timeout ~= nil and type(timeout) ~= "number" then
    error("timeout must be a number of seconds or nil, got " .. type(timeout), (level or 1) + 1)
  end
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
  -- A timer or a settle that ends the wait also ends the loop's run, so
  -- uv.run does not go back to polling for something else.
  local timer, expired, active = nil, false, true
  if subscribe then subscribe(function() if active then uv.stop() end end) end
  if timeout then
    timer = acquire_timer(timeout, function()
      expired = true
      uv.stop()
    end, true)
  end
  local stuck, grace, graced = false, nil, false
  local function finish()
    active = false
    main_waits = main_waits - 1
    if timer then release_timer(timer) end
    if grace then release_timer(grace) end
  end
  main_waits = main_waits + 1
  interrupt_requested = false
  while not done() and not expired do
    if interrupt_requested then
      interrupt_requested = false
      if not on_interrupt or grace then
        finish()
        interrupted_error(level or 1)
      end
      -- Interrupt again every tenth of the grace: a signal can be lost when
      -- two meet, and a task queued on an engine starts only later.
      local ticks = 0
      local function again()
        local ok, err = pcall(on_interrupt)
        if not ok then io.stderr:write("lpar: interrupting the tasks failed: ", tostring(err), "\n") end
      end
      local function tick()
        ticks = ticks + 1
        if ticks >= 10 then
          graced = true
          uv.stop()
        else
          again()
          grace:start(math.ceil(INTERRUPT_GRACE * 100), 0, tick)
        end
      end
      grace = acquire_timer(INTERRUPT_GRACE / 10, tick, true)
      again()
    elseif graced then
      finish()
      interrupted_error(level or 1)
    elseif not uv.run("once") and not done() and not expired and not interrupt_requested then
      -- The loop has nothing left that could finish this wait.
      stuck = true
      break
    end
  end
  finish()
  return done(), stuck
end

return wait
