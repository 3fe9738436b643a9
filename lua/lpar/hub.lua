--- The client side of one cluster: its engines, the requests pending on
-- them, and every event the C core reports.
-- A Hub does not care how its engines are reached: its core is an
-- lpar.cluster, either of local children (Hub.embedded) or of the engines
-- behind a standalone controller (Hub.connect); both take the same sends and
-- report the same events. A connected hub also talks to its controller,
-- with control calls (Hub:call) for what only the controller can do.
local core = require "lpar.core"
local errors = require "lpar.errors"
local targets = require "lpar.targets"
local wait = require "lpar.wait"
-- Loading lpar.matrix settles OpenBLAS's kernel (OPENBLAS_CORETYPE, see
-- matrix.blas_info) before any engine is spawned, so the engines inherit it.
require "lpar.matrix"

local Hub = {}
Hub.__index = Hub

-- When a collection has left much heap free (a big map released), give
-- it back to the system: glibc keeps freed heap otherwise. A finalizer that
-- makes its successor runs once per collection cycle; it looks at most
-- twice a second, since asking malloc what lies free walks its whole heap
-- (a busy client collects many times a second), and less often when a look
-- took long: a trim of a big heap can take a fifth of a second, which a
-- client churning through results at that size would pay again and again.
do
  local next_look = 0
  local function watch()
    setmetatable({}, { __gc = function()
      local now = core.now()
      if now >= next_look then
        core.trim(64 * 1024 * 1024)
        local took = core.now() - now
        next_look = now + math.max(0.5, 20 * took)
      end
      watch()
    end })
  end
  watch()
end

local CALL_TIMEOUT = 10

-- Engines send a heartbeat every core.HEARTBEAT_MS (or the period their
-- hello says), busy or idle; a ready engine silent core.NOT_RESPONDING_BEATS
-- periods is stopped or wedged: "not responding". One that sends none is
-- never judged.

local signal_names = {
  [1] = "SIGHUP", [2] = "SIGINT", [3] = "SIGQUIT", [4] = "SIGILL", [6] = "SIGABRT",
  [7] = "SIGBUS", [8] = "SIGFPE", [9] = "SIGKILL", [11] = "SIGSEGV", [13] = "SIGPIPE",
  [14] = "SIGALRM", [15] = "SIGTERM",
}

local function describe_exit(status, signal)
  if signal and signal > 0 then
    return string.format("was killed by signal %d (%s)", signal, signal_names[signal] or "?")
  end
  return string.format("exited with status %d", status)
end

local function new_state(fields)
  local self = setmetatable({
    engines = {},    -- id -> { state = "starting"|"ready"|"dead", pid =, how = }
    pending = {},    -- request id -> record { ar =, kind =, engine =, id = }
    npending = 0,
    pending_reset = 0,
    next_id = 0,
    on_ready = {},   -- callbacks for engines coming up or going
    calls = {},      -- control call id -> function(answer...) (connected hubs)
  }, Hub)
  for k, v in pairs(fields) do self[k] = v end
  return self
end

--- The core's handler must not keep the hub alive, or a dropped Cluster
-- would never be collected and its engines never stopped. The second
-- function takes results, which the core hands over without their kind.
local function handler_for(self)
  local weak = setmetatable({ self }, { __mode = "v" })
  return function(kind, ...)
    local hub = weak[1]
    if hub then hub[kind](hub, ...) end
  end, function(...)
    local hub = weak[1]
    if hub then hub:result(...) end
  end
end

--- A hub over a new cluster of local engines (none started yet).
-- opts: engine (path), env (table NAME = value, or list of "NAME=value"), blas_threads.
function Hub.embedded(opts)
  local self = new_state { engine_path = opts.engine or core.engine_path }
  local env = {}
  for k, v in pairs(opts.env or {}) do
    if type(k) == "string" then env[#env + 1] = k .. "=" .. tostring(v)
    else env[#env + 1] = v end
  end
  local handler, on_result = handler_for(self)
  local c, err = core.new_cluster { engine = self.engine_path, env = env, blas_threads = opts.blas_threads,
                                    handler = handler, on_result = on_result }
  if not c then error(err, 3) end
  self.core = c
  return self
end

--- A hub over the engines behind the controller at `address` ({ path = }
-- or { host =, port = }), with `key`. Returns at once; Hub:call("connect")
-- says whether the controller is there. nil and a message when the address
-- cannot be tried at all.
function Hub.connect(address, key, fields)
  local self = new_state(fields or {})
  self.controller, self.next_call = true, 0
  local handler, on_result = handler_for(self)
  local c, err = core.connect { path = address.path, host = address.host, port = address.port,
                                key = key, handler = handler, on_result = on_result }
  if not c then return nil, err end
  self.core = c
  return self
end

--- Start local engine `id` of `n`. Returns its pid.
function Hub:spawn(id, n)
  local pid, err = self.core:spawn(id, n)
  if not pid then error(err, 0) end
  self.engines[id] = { state = "starting", pid = pid }
  self.ids_cache = nil
  return pid
end

--- Sorted ids of the engines that are up (a fresh list: callers may keep it).
function Hub:ids()
  local ids = self:ids_shared()
  return table.move(ids, 1, #ids, 1, {})
end

--- The same list, cached until an engine comes or goes: not to be changed.
function Hub:ids_shared()
  local ids = self.ids_cache
  if ids then return ids end
  ids = {}
  for id, e in pairs(self.engines) do
    if e.state == "ready" then ids[#ids + 1] = id end
  end
  table.sort(ids)
  self.ids_cache = ids
  return ids
end

--- Every engine id known, up or not, sorted.
function Hub:all_ids()
  local ids = {}
  for id in pairs(self.engines) do ids[#ids + 1] = id end
  table.sort(ids)
  return ids
end

function Hub:engine_state(id)
  local e = self.engines[id]
  return e and e.state
end

--- The ids `spec` names among the engines that are up (see lpar.targets);
-- raises at `level` above the caller, naming a dead engine and how it died.
function Hub:resolve_targets(spec, level)
  local ok, ids = pcall(targets.resolve, spec, self:ids_shared(), function(id)
    return self.engines[id] and self:unavailable(id)
  end)
  if not ok then error(ids, level + 1) end
  return ids
end

--- The reason `engine` cannot take a request, or nil when it can.
function Hub:unavailable(engine)
  local e = self.engines[engine]
  if self.core and e and e.state ~= "dead" and e.state ~= "lost" then return nil end
  local how = self.unreachable or (not self.core and "is stopped") or (not e and "does not exist")
    or (e.how .. "; Cluster:restart_engines brings it back")
  return errors.EngineError.new(engine, nil, how)
end

--- An engine whose socket closed before its exit was seen: it takes nothing
-- more (load-balanced tasks go elsewhere), and when we may run the loop, wait
-- a moment for the exit so the error says how the engine ended. The error.
local function lost(self, engine, err)
  local e = self.engines[engine]
  if e.state == "ready" then
    e.state, e.how = "lost", "lost its connection (" .. err .. ")"
    self.ids_cache = nil
  end
  if not core.loop_running() then
    wait.until_done(function() return self.engines[engine].state == "dead" end, 1)
  end
  return errors.EngineError.new(engine, nil, self.engines[engine].how)
end

local function track(self, engine, id, record)
  record.engine, record.id = engine, id
  self.pending[id] = record
  self.npending = self.npending + 1
end

--- Send a request; `record` ({ ar =, kind =, deadline =, one = }) receives
-- the answer through its ar: its values packed, or only the first if
-- `one`. With a deadline (core.now() seconds) the engine drops the request
-- unstarted once it has passed, and says when it starts
-- (ar:_started(record)). Returns the request id, or nil and an error (a
-- message or an EngineError).
function Hub:submit(engine, mtype, root, record, ...)
  local gone = self:unavailable(engine)
  if gone then return nil, gone end
  self.next_id = self.next_id + 1
  local id = self.next_id
  local ok, err, code
  if record.deadline then
    ok, err, code = self.core:send_by(engine, mtype, id, record.deadline, root, ...)
  else
    ok, err, code = self.core:send(engine, mtype, id, root, ...)
  end
  if not ok then
    if code ~= core.EDEAD then return nil, err end
    return nil, lost(self, engine, err)
  end
  track(self, engine, id, record)
  return id
end

--- A request for whichever engine the controller picks (connected hubs):
-- it schedules every client's such requests together, sending this one to
-- the least-loaded engine holding fewer than `depth` requests. The record
-- learns its engine (record.engine) when the controller says where it went
-- (record.ar:_placed(record)), or, when it was withdrawn unsent
-- (Hub:interrupt_task(nil, id)), gets record.ar:_withdrawn(record) instead.
-- Returns the request id, or nil and an error.
function Hub:submit_balanced(depth, mtype, root, record, ...)
  if not self.core then return nil, errors.EngineError.new(nil, nil, "is stopped") end
  self.next_id = self.next_id + 1
  local id = self.next_id
  local any = core.ANY_ENGINE + depth
  local ok, err, code
  if record.deadline then
    ok, err, code = self.core:send_by(any, mtype, id, record.deadline, root, ...)
  else
    ok, err, code = self.core:send(any, mtype, id, root, ...)
  end
  if not ok then
    if code == core.EDEAD or code == core.ECLOSED then
      return nil, errors.EngineError.new(nil, nil, "is unreachable: " .. err)
    end
    return nil, err
  end
  track(self, nil, id, record)
  return id
end

--- The same request to every engine of `engines` (up, as Hub:unavailable
-- says), encoded once: behind a controller one frame, which crosses each
-- host's link once; records[i] receives engines[i]'s answer. Returns a
-- table of errors by index, for the engines it did not reach (empty when
-- it reached all).
function Hub:submit_many(engines, mtype, root, records, ...)
  -- Engines that take shared memory and those that take matrices inline get an encoding each.
  local groups, order = {}, {}
  for i, engine in ipairs(engines) do
    local key = self.core:passes_fds(engine)
    local g = groups[key]
    if not g then
      g = { engines = {}, index = {} }
      groups[key], order[#order + 1] = g, key
    end
    g.engines[#g.engines + 1], g.index[#g.index + 1] = engine, i
  end
  local errs = {}
  for _, key in ipairs(order) do
    local g = groups[key]
    local first = self.next_id + 1
    self.next_id = self.next_id + #g.engines
    local ok, err, code = self.core:send_many(g.engines, mtype, first, root, ...)
    for j, engine in ipairs(g.engines) do
      local i = g.index[j]
      if ok then
        track(self, engine, first + j - 1, records[i])
      elseif ok == false and not err[j] then
        track(self, engine, first + j - 1, records[i])
      else
        local why, why_code = err, code
        if ok == false then why, why_code = err[j][1], err[j][2] end
        errs[i] = why_code == core.EDEAD and lost(self, engine, why) or why
      end
    end
  end
  return errs
end

function Hub:send_raw(engine, bytes)
  if self.controller then return nil, "raw bytes go only to a local cluster's engines" end
  return self.core:send_raw(engine, bytes)
end

-- Events from the core, one method per kind.

function Hub:ready(engine, hello, pid)
  local e = self.engines[engine]
  if not e or (self.controller and e.state == "dead") then -- new, or back after a restart
    if not self.controller and not e then return end
    e = { state = "starting" }
    self.engines[engine] = e
  end
  e.state, e.hello, e.pid = "ready", hello, pid
  self.ids_cache = nil
  for _, fn in ipairs(self.on_ready) do fn(engine) end
end

local function take(self, id)
  local rec = self.pending[id]
  if rec then
    self.pending[id] = nil
    self.npending = self.npending - 1
    -- Lua tables do not shrink when emptied: after a burst, start afresh.
    if self.npending == 0 and id > self.pending_reset + 4096 then
      self.pending, self.pending_reset = {}, id
    end
  end
  return rec
end

function Hub:result(_, id, started, completed, ...)
  local rec = take(self, id)
  -- A record that wants one value (a map's task) gets it without a table.
  if not rec then return end
  if rec.one then
    rec.ar:_settle(rec, true, started, completed, (...)) -- nil and false too
  else
    rec.ar:_settle(rec, true, started, completed, table.pack(...))
  end
end

function Hub:error(engine, id, started, completed, err)
  local rec = take(self, id)
  if rec then
    local e = errors.RemoteError.new(engine, rec.kind, type(err) == "table" and err
      or { message = tostring(err) }, id)
    rec.ar:_settle(rec, false, started, completed, e)
  end
end

--- The controller sent load-balanced request `id` to `engine` (nil: it
-- was withdrawn, unsent, as asked).
function Hub:placed(engine, id)
  if engine == nil then
    local rec = take(self, id)
    if rec then rec.ar:_withdrawn(rec) end
    return
  end
  local rec = self.pending[id]
  if rec then
    rec.engine = engine
    rec.ar:_placed(rec)
  end
end

function Hub:started(_, id)
  local rec = self.pending[id]
  if rec and rec.ar._started then rec.ar:_started(rec) end
end

function Hub:stdout(_, id, text)
  local rec = self.pending[id]
  if rec then rec.ar:_stream(rec, "stdout", text) end
end

function Hub:stderr(_, id, text)
  local rec = self.pending[id]
  if rec then rec.ar:_stream(rec, "stderr", text) end
end

function Hub:display(engine, id, mime, data, metadata)
  local rec = self.pending[id]
  if rec then
    rec.ar:_display(rec, { engine = engine, task = id, type = mime, data = data, metadata = metadata or {} })
  end
end

--- A reply that did not decode (the core counts it): its request fails.
function Hub:undecodable(engine, id, why)
  local rec = take(self, id)
  if rec then
    local e = errors.RemoteError.new(engine, rec.kind,
      { message = "the engine's reply could not be decoded: " .. why }, id)
    rec.ar:_settle(rec, false, nil, nil, e)
  end
end

function Hub:bad(engine, reason)
  local e = self.engines[engine]
  if e then e.bad = reason end
end

--- Fail every pending request of `engine` with an EngineError saying `how`
-- (engine nil: those still waiting in the controller for an engine).
function Hub:fail_engine(engine, how)
  local now, failed = core.now(), {}
  for id, rec in pairs(self.pending) do
    if rec.engine == engine then failed[#failed + 1] = id end
  end
  -- Settled after the walk: settling may submit new requests.
  table.sort(failed)
  for _, id in ipairs(failed) do
    local rec = take(self, id)
    if rec then rec.ar:_settle(rec, false, nil, now, errors.EngineError.new(engine, id, how)) end
  end
end

function Hub:exit(engine, status, signal, why)
  local e = self.engines[engine]
  if not e then
    if not self.controller then return end
    e = { state = "starting" }
    self.engines[engine] = e
  end
  -- `why`: the controller's word on an engine behind another host's link.
  local how = why and ("is unreachable: " .. why) or describe_exit(status, signal)
  if e.bad then how = "sent a malformed message (" .. e.bad .. ") and was disconnected; it " .. how end
  e.state, e.how, e.status, e.signal = "dead", how, status, signal
  self.ids_cache = nil
  self:fail_engine(engine, how)
  for _, fn in ipairs(self.on_ready) do fn(engine) end
end

--- Mark every engine unreachable and fail what is pending.
local function cut_off(self, how)
  self.unreachable = how
  for id, e in pairs(self.engines) do
    if e.state ~= "dead" then
      e.state, e.how = "dead", how
      self.ids_cache = nil
      self:fail_engine(id, how)
      for _, fn in ipairs(self.on_ready) do fn(id) end
    end
  end
  self:fail_engine(nil, how) -- what still waited in the controller for an engine
end

--- The link to the controller closed.
function Hub:closed(reason)
  self.link_lost = reason
  for id, on_answer in pairs(self.calls) do
    self.calls[id] = nil
    if on_answer then on_answer(nil, self:lost()) end
  end
  if self.closing then return end
  cut_off(self, "is unreachable: the connection to its controller was lost (" .. reason .. ")")
end

function Hub:lost()
  -- A controller that refused the connection (out of descriptors) said why: that is the whole story.
  if self.link_lost and self.link_lost:find("^the controller refused") then return self.link_lost end
  return "the connection to the controller was lost (" .. (self.link_lost or "it went away") .. ")"
end

-- Control calls (connected hubs).

--- The controller answered call `id`.
function Hub:control(id, ...)
  local on_answer = self.calls[id]
  if on_answer == nil then return end
  self.calls[id] = nil
  if on_answer then on_answer(...) end
end

--- Send a control operation; `on_answer(value, message...)` gets its answer.
function Hub:post(on_answer, op, ...)
  if self.link_lost or not self.core then return nil, self:lost() end
  self.next_call = self.next_call + 1
  local ok, err = self.core:send(0, core.CONTROL, self.next_call, op, op, ...)
  if not ok then return nil, err end
  self.calls[self.next_call] = on_answer or false
  return true
end

--- A control operation, waited for: its answer's values, or nil and a message.
function Hub:call(op, ...)
  local answered, result = false, nil
  local ok, err = self:post(function(...) answered, result = true, table.pack(...) end, op, ...)
  if not ok then return nil, err end
  wait.until_done(function() return answered end, CALL_TIMEOUT, nil, 3)
  if not answered then
    -- No hello either: it never took the connection (stopped, wedged, or
    -- unable to accept one), which is not the same as a slow answer.
    if self.core and not self.core:stats().session then
      return nil, string.format("the controller did not take the connection within %d s (its hello never " ..
        "came: it may be stopped, overloaded or out of file descriptors)", CALL_TIMEOUT)
    end
    return nil, "the controller did not answer '" .. op .. "' within " .. CALL_TIMEOUT .. " s"
  end
  return table.unpack(result, 1, result.n)
end

-- Cluster controls, the same on either kind of hub.

--- Send a signal (number or name) to an engine.
function Hub:signal(engine, sig)
  local gone = self.controller and self:unavailable(engine)
  local ok, err = not gone, gone and gone.how
  if not gone then ok, err = self.core:signal(engine, sig) end
  if not ok then error(string.format("cannot signal engine %d: %s", engine, err), 3) end
end

--- Interrupt request `id` on `engine`, if it is still the one running
-- there; engine nil: withdraw load-balanced request `id` from the
-- controller if it still waits there (Hub:placed follows either way).
function Hub:interrupt_task(engine, id)
  if self.core then self.core:interrupt(engine or core.ANY_ENGINE, id) end
end

--- Wait until `ids` are all up; raises naming those that are not.
function Hub:wait_ready(ids, timeout, level)
  local function settled()
    for _, id in ipairs(ids) do
      if self:engine_state(id) == "starting" then return false end
    end
    return true
  end
  wait.until_done(settled, timeout, nil, level + 1)
  local missing = {}
  for _, id in ipairs(ids) do
    local e = self.engines[id]
    if not e or e.state ~= "ready" then
      missing[#missing + 1] = string.format("engine %d %s", id,
        e and e.state == "dead" and e.how or ("did not say hello within " .. timeout .. " s"))
    end
  end
  if #missing > 0 then
    error("cluster did not come up: " .. table.concat(missing, "; "), level + 1)
  end
end

--- Kill (if running) and start again engines `ids` of `n`, and wait for them.
function Hub:restart(ids, n, timeout, level)
  if self.controller then
    local ok, err = self:call("restart", ids)
    if not ok then error("restart_engines: " .. tostring(err), level + 1) end
    return -- the answer follows the engines' hellos on the same link
  end
  for _, id in ipairs(ids) do
    -- A lost engine may have exited already: its exit is on the way.
    if self:engine_state(id) ~= "dead" then pcall(self.signal, self, id, "KILL") end
  end
  wait.until_done(function()
    for _, id in ipairs(ids) do
      if self:engine_state(id) ~= "dead" then return false end
    end
    return true
  end, 5, nil, level + 1)
  for _, id in ipairs(ids) do self:spawn(id, n) end
  self:wait_ready(ids, timeout, level + 1)
end

--- Is ready local engine `id` silent past the limit (stopped or wedged)?
-- Engines behind a controller are watched there (its status says).
function Hub:not_responding(id)
  if self.controller or not self.core then return false end
  local ms, beat = self.core:silence(id)
  return ms ~= nil and beat > 0 and ms > core.NOT_RESPONDING_BEATS * beat
end

--- Per engine: requests in flight and state; plus what was dropped.
function Hub:queue_status()
  local stats = self.core and self.core:stats() or { bad_messages = 0, undecodable = 0 }
  local status = {}
  if self.controller and self.core then
    local st, err = self:call("status")
    if not st then error("queue_status: " .. tostring(err), 3) end
    for id, e in pairs(st.engines) do
      status[id] = { queue = e.queue, state = e.state, pid = e.pid, silent_ms = e.silent_ms, host = e.host,
                     link_sent = e.link_sent }
    end
    status.bad_messages, status.refused, status.disconnected, status.clients, status.no_fds, status.waiting =
      st.bad_messages, st.refused, st.disconnected, st.clients, st.no_fds, st.waiting
  else
    local host = require("luv").os_gethostname()
    for id, e in pairs(self.engines) do
      local state = e.state
      if state == "ready" and self:not_responding(id) then state = "not responding" end
      status[id] = { queue = 0, state = state, pid = e.pid, host = host,
                     silent_ms = e.state == "ready" and self.core:silence(id) or nil }
    end
    for _, rec in pairs(self.pending) do
      local s = status[rec.engine]
      if s then s.queue = s.queue + 1 end
    end
    status.bad_messages = stats.bad_messages
  end
  status.undecodable = stats.undecodable
  return status
end

--- Ask the controller to stop the whole cluster (connected hubs).
function Hub:shutdown()
  local ok, err = self:call("shutdown")
  if not ok and not self.link_lost then error("shutdown: " .. tostring(err), 3) end
  self:stop("is stopped: the cluster was shut down")
end

--- Stop: local engines are stopped; a connected hub detaches (its cluster
-- goes on). Pending requests fail with an EngineError saying `how`.
function Hub:stop(how)
  if not self.core then return end
  self.closing = true
  self.core:stop()
  self.core = nil
  cut_off(self, how or (self.controller and "is unreachable: this client was closed (the cluster goes on)"
    or "was stopped with its cluster"))
end

return Hub
