--- The client side of one cluster connection: engines, pending requests
-- and the handling of every event the C core reports.
-- A Hub is shared by a Cluster and the Clients connected through it.
local core = require "lpar.core"
local errors = require "lpar.errors"
local targets = require "lpar.targets"
local wait = require "lpar.wait"
-- Loading lpar.matrix settles OpenBLAS's kernel (OPENBLAS_CORETYPE, see
-- matrix.blas_info) before any engine is spawned, so the engines inherit it.
require "lpar.matrix"

local Hub = {}
Hub.__index = Hub

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

--- The state every hub starts with, under metatable `mt` (Hub or a kind of it),
-- plus `fields`.
function Hub.new_state(mt, fields)
  local self = setmetatable({
    engines = {},    -- id -> { state = "starting"|"ready"|"dead", pid =, n =, how = }
    pending = {},    -- request id -> record
    npending = 0,
    pending_reset = 0,
    next_id = 0,
    undecodable_count = 0,
    on_ready = {},   -- callbacks waiting for engines to come up
  }, mt)
  for k, v in pairs(fields or {}) do self[k] = v end
  return self
end

--- A hub over a new embedded cluster (no engine started yet).
-- opts: engine (path), env (list of "NAME=value"), blas_threads.
function Hub.embedded(opts)
  local self = Hub.new_state(Hub)
  -- The core's handler must not keep the hub alive, or a dropped Cluster
  -- would never be collected and its engines never stopped.
  local weak = setmetatable({ self }, { __mode = "v" })
  local env = {}
  for k, v in pairs(opts.env or {}) do
    if type(k) == "string" then env[#env + 1] = k .. "=" .. tostring(v)
    else env[#env + 1] = v end
  end
  local c, err = core.new_cluster {
    engine = opts.engine,
    env = env,
    blas_threads = opts.blas_threads,
    handler = function(kind, ...)
      local hub = weak[1]
      if hub then hub[kind](hub, ...) end
    end,
  }
  if not c then error(err, 3) end
  self.core = c
  self.engine_path = opts.engine or core.engine_path
  return self
end

--- Start engine `id` of `n`. Returns its pid.
function Hub:spawn(id, n)
  local pid, err = self.core:spawn(id, n)
  if not pid then
    error(string.format("cannot start engine %d from %s: %s", id, self.engine_path, err), 0)
  end
  self.engines[id] = { state = "starting", pid = pid, n = n }
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
  if self.core and e and e.state ~= "dead" then return nil end
  local how = not self.core and "is stopped" or not e and "does not exist"
    or (e.how .. "; Cluster:restart_engines brings it back")
  return errors.EngineError.new(engine, nil, how)
end

--- Send a request; `record` receives the answer through its `ar`.
-- Returns the request id, or nil and an error (a message or an EngineError).
function Hub:submit(engine, mtype, root, record, ...)
  local gone = self:unavailable(engine)
  if gone then return nil, gone end
  self.next_id = self.next_id + 1
  local id = self.next_id
  local ok, err, code = self.core:send(engine, mtype, id, root, ...)
  if not ok then
    if code == core.EDEAD and not core.loop_running() then
      -- Its socket closed just before its exit was seen: wait a moment for
      -- the exit, so the error says how the engine ended.
      wait.until_done(function() return self.engines[engine].state == "dead" end, 1)
      gone = self:unavailable(engine)
      if gone then return nil, gone end
    end
    return nil, err
  end
  record.engine, record.id = engine, id
  self.pending[id] = record
  self.npending = self.npending + 1
  return id
end

function Hub:send_raw(engine, bytes)
  return self.core:send_raw(engine, bytes)
end

-- Events from the core, one method per kind.

function Hub:ready(engine, hello)
  local e = self.engines[engine]
  if not e then return end
  e.state, e.hello = "ready", hello
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
  if rec then rec.ar:_settle(rec, true, started, completed, table.pack(...)) end
end

function Hub:error(engine, id, started, completed, err)
  local rec = take(self, id)
  if rec then
    local e = errors.RemoteError.new(engine, rec.kind, type(err) == "table" and err
      or { message = tostring(err) }, id)
    rec.ar:_settle(rec, false, started, completed, e)
  end
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

function Hub:undecodable(engine, id, why)
  self.undecodable_count = self.undecodable_count + 1
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

--- Fail every pending request of `engine` with an EngineError saying `how`.
function Hub:fail_engine(engine, how)
  local now = core.now()
  for id, rec in pairs(self.pending) do
    if rec.engine == engine then
      take(self, id)
      rec.ar:_settle(rec, false, nil, now, errors.EngineError.new(engine, id, how))
    end
  end
end

function Hub:exit(engine, status, signal)
  local e = self.engines[engine]
  if not e then return end
  local how = describe_exit(status, signal)
  if e.bad then how = "sent a malformed message (" .. e.bad .. ") and was disconnected; it " .. how end
  e.state, e.how, e.status, e.signal = "dead", how, status, signal
  self.ids_cache = nil
  self:fail_engine(engine, how)
  for _, fn in ipairs(self.on_ready) do fn(engine) end
end

function Hub:signal(engine, sig)
  local ok, err = self.core:signal(engine, sig)
  if not ok then error(string.format("cannot signal engine %d: %s", engine, err), 3) end
end

--- Interrupt request `id` on `engine`, if it is still the one running there.
function Hub:interrupt_task(engine, id)
  if self.core then self.core:interrupt(engine, id) end
end

function Hub:stats()
  local s = self.core and self.core:stats() or { bad_messages = 0, undecodable = 0 }
  s.undecodable = self.undecodable_count
  return s
end

--- Stop every engine; pending requests fail.
function Hub:stop()
  if not self.core then return end
  self.core:stop()
  self.core = nil
  for id, e in pairs(self.engines) do
    if e.state ~= "dead" then
      e.state, e.how = "dead", "was stopped with its cluster"
      self.ids_cache = nil
      self:fail_engine(id, e.how)
    end
  end
end

return Hub
