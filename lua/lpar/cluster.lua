--- Cluster: local engines started and owned by this process.
--   local rc <close> = lpar.Cluster{n = 4}:start_and_connect()
-- Options: n (engines, default 4), engine_env (table of NAME = value, or a
-- list of "NAME=value"), blas_threads (OPENBLAS_NUM_THREADS on the engines,
-- default 1), engine (path of lpar-engine), timeout (seconds to wait for
-- engines to come up, default 30).
-- A Cluster is to-be-closed, and its engines are stopped when it is
-- garbage collected or the process exits; a SIGKILLed client leaves none
-- either, since engines exit when their socket closes.
--
-- With a profile, the Cluster is standalone: start() launches a controller
-- process (as `lpar cluster start --daemonize` does) that several clients
-- can connect to and that outlives each of them; stop() shuts it down.
-- Cluster{profile = P} also drives a cluster started elsewhere: client(),
-- restart_engines() and signal_engines() work on it, and stop() stops it.
local Hub = require "lpar.hub"
local Client = require "lpar.client"
local wait = require "lpar.wait"

local Cluster = {}
Cluster.__index = Cluster

function Cluster.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("Cluster: expected a table of options", 2) end
  local n = opts.n or 4
  if math.type(n) ~= "integer" or n < 1 then error("Cluster: n must be a positive integer", 2) end
  local self = setmetatable({ n = n, opts = opts, profile = opts.profile }, Cluster)
  if opts.profile ~= nil then
    local ok, err = pcall(require("lpar.profile").check_name, opts.profile)
    if not ok then error("Cluster: " .. err, 2) end
    self.standalone = true
  end
  return self
end

-- ---- standalone (with a profile) ----

local function remote_hub(self, level)
  local hub = self._hub
  if hub and hub.core then return hub end
  local ok, h = pcall(require("lpar.remote").connect, { profile = self.profile })
  if not ok then error(h, level + 1) end
  self._hub = h
  return h
end

--- The ids of a standalone cluster's engines, as its controller knows them
-- (the cluster may have been started elsewhere, with another n).
local function standalone_ids(hub)
  local ids = {}
  for id in pairs(hub.engines) do ids[#ids + 1] = id end
  table.sort(ids)
  return ids
end

local function start_standalone(self, level)
  local commands = require "lpar.commands"
  local args = { "-n", tostring(self.n) }
  if self.opts.ip then args[#args + 1] = "--ip"; args[#args + 1] = self.opts.ip end
  if self.opts.port then args[#args + 1] = "--port"; args[#args + 1] = tostring(self.opts.port) end
  local pid, err = commands.start_daemon(self.profile, args)
  if not pid then error(string.format("Cluster: cannot start cluster %q: %s", self.profile, err), level + 1) end
  self.started_pid = pid
  return self
end

function Cluster:__tostring()
  if self.standalone then
    return string.format("<Cluster n=%d profile=%s%s>", self.n, self.profile,
      self.started_pid and (" pid=" .. self.started_pid) or "")
  end
  local state = self._hub and (self._hub.core and "running" or "stopped") or "not started"
  return string.format("<Cluster n=%d %s>", self.n, state)
end

local function wait_engines(self, ids, timeout, level)
  local hub = self._hub
  local function settled()
    for _, id in ipairs(ids) do
      if hub:engine_state(id) == "starting" then return false end
    end
    return true
  end
  wait.until_done(settled, timeout, nil, level + 1)
  local missing = {}
  for _, id in ipairs(ids) do
    local e = hub.engines[id]
    if e.state ~= "ready" then
      missing[#missing + 1] = string.format("engine %d %s", id,
        e.state == "dead" and e.how or ("did not say hello within " .. timeout .. " s"))
    end
  end
  if #missing > 0 then
    error("cluster did not come up: " .. table.concat(missing, "; "), level + 1)
  end
end

local function all_ids(self)
  local ids = {}
  for i = 0, self.n - 1 do ids[#ids + 1] = i end
  return ids
end

--- Start the engines (returns at once; they say hello shortly).
local function start(self, level)
  if self._hub and self._hub.core then error("Cluster:start: already started", level + 1) end
  self._hub = Hub.embedded { engine = self.opts.engine, env = self.opts.engine_env,
                             blas_threads = self.opts.blas_threads }
  for _, id in ipairs(all_ids(self)) do
    local ok, err = pcall(self._hub.spawn, self._hub, id, self.n)
    if not ok then
      self._hub:stop() -- none half-started
      error(err, level + 1)
    end
  end
  return self
end

function Cluster:start()
  if self.standalone then return start_standalone(self, 2) end
  return start(self, 2)
end

--- Wait until every engine is ready (raises naming those that are not).
function Cluster:wait_for_engines(timeout)
  local ids = self.standalone and standalone_ids(remote_hub(self, 2)) or all_ids(self)
  wait_engines(self, ids, timeout or self.opts.timeout or 30, 2)
  return self
end

--- A Client of this cluster.
function Cluster:client()
  if self.standalone then return Client.new(remote_hub(self, 2)) end
  if not self._hub then error("Cluster:client: start the cluster first", 2) end
  return Client.new(self._hub)
end

--- Start, wait for every engine, and return a Client that owns the cluster.
function Cluster:start_and_connect(timeout)
  if self.standalone then
    start_standalone(self, 2)
    return Client.new(remote_hub(self, 2), self)
  end
  start(self, 2)
  wait_engines(self, all_ids(self), timeout or self.opts.timeout or 30, 2)
  return Client.new(self._hub, self)
end

local function resolve_ids(self, ids)
  if ids == nil then return all_ids(self) end
  if math.type(ids) == "integer" then return { ids } end
  return ids
end

--- Kill (if running) and start again the given engines (default all), and
-- wait for them. Their globals are lost, as in ipyparallel.
function Cluster:restart_engines(ids, timeout)
  if self.standalone then
    local hub = remote_hub(self, 2)
    hub:restart_engines(ids == nil and standalone_ids(hub) or resolve_ids(self, ids), 2)
    return self
  end
  local hub = self._hub
  if not (hub and hub.core) then error("Cluster:restart_engines: the cluster is not running", 2) end
  ids = resolve_ids(self, ids)
  for _, id in ipairs(ids) do
    if hub:engine_state(id) ~= "dead" then
      hub:signal(id, "KILL")
    end
  end
  wait.until_done(function()
    for _, id in ipairs(ids) do
      if hub:engine_state(id) ~= "dead" then return false end
    end
    return true
  end, 5, nil, 2)
  for _, id in ipairs(ids) do hub:spawn(id, self.n) end
  wait_engines(self, ids, timeout or self.opts.timeout or 30, 2)
  return self
end

--- Send a signal (number or name: "INT", "SIGKILL", ...) to engines.
function Cluster:signal_engines(sig, ids)
  if self.standalone then
    local hub = remote_hub(self, 2)
    for _, id in ipairs(ids == nil and hub:ids() or resolve_ids(self, ids)) do hub:signal(id, sig) end
    return
  end
  local hub = self._hub
  if not (hub and hub.core) then error("Cluster:signal_engines: the cluster is not running", 2) end
  for _, id in ipairs(resolve_ids(self, ids)) do hub:signal(id, sig) end
end

--- Stop every engine; their pending results fail with an EngineError.
-- A standalone cluster that is not running (any more) is left alone.
function Cluster:stop()
  if self.standalone then
    if self._hub then self._hub:stop("is stopped: its cluster was stopped") end
    local profile = require "lpar.profile"
    if not require("luv").fs_stat(profile.connection_file(self.profile)) then
      self.started_pid = nil
      return
    end
    local ok, err = pcall(require("lpar.commands").stop_cluster, self.profile)
    self.started_pid = nil
    if not ok then error("Cluster:stop: " .. err, 2) end
    return
  end
  if self._hub then self._hub:stop() end
end

-- A standalone cluster is stopped at scope exit or collection only when
-- this object started it (as ipyparallel's Cluster does at exit).
Cluster.__close = function(self)
  if self.standalone and not self.started_pid then return end
  pcall(self.stop, self)
end

Cluster.__gc = function(self)
  if not self.standalone then return self:stop() end
  -- A finalizer must not run the loop (this may be lua_close, with luv's
  -- handles half gone): SIGTERM makes the controller stop its engines and
  -- remove its files by itself.
  local pid = self.started_pid
  if pid and require("lpar.profile").alive(pid) then require("luv").kill(pid, "sigterm") end
end

return Cluster
