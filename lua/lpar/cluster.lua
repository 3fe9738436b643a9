--- Cluster: engines started and owned by this process.
--   local rc <close> = lpar.Cluster{n = 4}:start_and_connect()
-- Options: n (engines, default 4), engine_env (table of NAME = value, or a
-- list of "NAME=value"), blas_threads (OPENBLAS_NUM_THREADS on the engines,
-- default 1), engine (path of lpar-engine), timeout (seconds to wait for
-- engines to come up, default 30), mem_limit (bytes each engine's Lua may
-- hold: past it a task fails with "not enough memory (limit N MB)").
-- A Cluster is to-be-closed, and its engines are stopped when it is
-- garbage collected or the process exits; a SIGKILLed client leaves none
-- either, since engines exit when their socket closes.
--
-- With a profile, the Cluster is standalone: start() launches a controller
-- process (as `lpar cluster start --daemonize` does) that several clients
-- can connect to and that outlives each of them; stop() shuts it down.
-- Cluster{profile = P} also drives a cluster started elsewhere: client(),
-- restart_engines() and signal_engines() work on it, and stop() stops it.
-- launcher = "ssh" | "mpi" | "slurm" (profile "default" unless given) starts
-- the engines elsewhere, as `lpar cluster start --launcher` does, with
-- hosts ("h1:4,h2:4" or a list), hostfile, ssh_command, remote_command,
-- mpiexec_args, ip (the address engines connect back to) and port.
-- Either way the engines are reached through one Hub; only starting and
-- stopping differ, and live in the two launchers below.
local Hub = require "lpar.hub"
local options = require "lpar.options"

local OPTIONS = options.set { "n", "profile", "engine_env", "blas_threads", "engine", "timeout", "mem_limit",
  "ip", "port", "launcher", "hosts", "hostfile", "ssh_command", "remote_command", "mpiexec_args" }
local Client = require "lpar.client"

local Cluster = {}
Cluster.__index = Cluster

-- ---- how a cluster starts and stops ----

--- The engines' environment: engine_env, and LPAR_MEM_LIMIT for mem_limit.
local function engine_env(opts)
  if opts.mem_limit == nil then return opts.engine_env end
  local env = {}
  for k, v in pairs(opts.engine_env or {}) do env[k] = v end
  env[#env + 1] = "LPAR_MEM_LIMIT=" .. opts.mem_limit
  return env
end

--- Engines that are children of this process.
local Local = {}

function Local.start(self, level)
  if self._hub and self._hub.core then error("Cluster:start: already started", level + 1) end
  self._hub = Hub.embedded { engine = self.opts.engine, env = engine_env(self.opts),
                             blas_threads = self.opts.blas_threads }
  for id = 0, self.n - 1 do
    local ok, err = pcall(self._hub.spawn, self._hub, id, self.n)
    if not ok then
      self._hub:stop() -- none half-started
      error(err, level + 1)
    end
  end
end

function Local.hub(self, level, what)
  if not (self._hub and self._hub.core) then
    error(string.format("Cluster:%s: the cluster is not running", what), level + 1)
  end
  return self._hub
end

--- The ids this cluster was asked for.
function Local.ids(self)
  local ids = {}
  for i = 0, self.n - 1 do ids[#ids + 1] = i end
  return ids
end

function Local.stop(self)
  if self._hub then self._hub:stop() end
end

function Local.finalize(self)
  self:stop()
end

--- A standalone controller process, found by its profile.
local Standalone = {}

-- Cluster options passed on to `lpar cluster start` as its options.
local START_OPTIONS = {
  { "ip", "--ip" }, { "port", "--port" }, { "launcher", "--launcher" }, { "hosts", "--hosts" },
  { "hostfile", "--hostfile" }, { "ssh_command", "--ssh-command" },
  { "remote_command", "--remote-command" }, { "mpiexec_args", "--mpiexec-args" },
  { "mem_limit", "--mem-limit" },
}

function Standalone.start(self, level)
  -- hosts with :K say how many; n then only when given.
  local args = (self.opts.n or not self.opts.hosts) and { "-n", tostring(self.n) } or {}
  for _, o in ipairs(START_OPTIONS) do
    local v = self.opts[o[1]]
    if type(v) == "table" then v = table.concat(v, ",") end -- hosts = { "a:2", "b:2" }
    if v ~= nil then args[#args + 1] = o[2]; args[#args + 1] = tostring(v) end
  end
  local pid, err = require("lpar.commands").start_daemon(self.profile, args)
  if not pid then error(string.format("Cluster: cannot start cluster %q: %s", self.profile, err), level + 1) end
  self.started_pid = pid
end

function Standalone.hub(self, level)
  local hub = self._hub
  if hub and hub.core then return hub end
  local ok, h = pcall(require("lpar.remote").connect, { profile = self.profile })
  if not ok then error(h, level + 1) end
  self._hub = h
  return h
end

--- The ids its controller knows (it may have been started elsewhere, with another n).
function Standalone.ids(self)
  return Standalone.hub(self, 2):all_ids()
end

--- Stop the controller, if it is still there.
function Standalone.stop(self)
  if self._hub then self._hub:stop("is stopped: its cluster was stopped") end
  local profile = require "lpar.profile"
  if not require("luv").fs_stat(profile.connection_file(self.profile)) then
    self.started_pid = nil
    return
  end
  local ok, err = pcall(require("lpar.commands").stop_cluster, self.profile)
  self.started_pid = nil
  if not ok then error("Cluster:stop: " .. err, 3) end
end

--- A finalizer must not run the loop (this may be lua_close, with luv's
-- handles half gone): SIGTERM makes the controller stop its engines and
-- remove its files by itself.
function Standalone.finalize(self)
  local pid = self.started_pid
  if pid and require("lpar.profile").alive(pid) then require("luv").kill(pid, "sigterm") end
end

-- ---- the Cluster ----

--- A Cluster, not started yet (lpar.Cluster). opts: n, profile, engine_env,
-- blas_threads, engine, timeout, ip, port; a misspelled key is an error.
function Cluster.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("Cluster: expected a table of options", 2) end
  options.check("Cluster", opts, OPTIONS)
  local n = opts.n or 4
  if math.type(n) ~= "integer" or n < 1 then error("Cluster: n must be a positive integer", 2) end
  if opts.mem_limit ~= nil then
    if math.type(opts.mem_limit) ~= "integer" then
      error("Cluster: mem_limit must be an integer (bytes), not " .. type(opts.mem_limit), 2)
    end
    options.mem_limit(opts.mem_limit, "Cluster: mem_limit")
  end
  local self = setmetatable({ n = n, opts = opts, profile = opts.profile, launcher = Local }, Cluster)
  -- Engines started elsewhere (ssh, mpi, slurm) join a standalone controller.
  if opts.launcher ~= nil and opts.launcher ~= "local" and opts.profile == nil then
    self.profile = "default"
  end
  if self.profile ~= nil then
    local ok, err = pcall(require("lpar.profile").check_name, self.profile)
    if not ok then error("Cluster: " .. err, 2) end
    self.launcher = Standalone
  end
  return self
end

function Cluster:__tostring()
  if self.launcher == Standalone then
    return string.format("<Cluster n=%d profile=%s%s>", self.n, self.profile,
      self.started_pid and (" pid=" .. self.started_pid) or "")
  end
  local state = self._hub and (self._hub.core and "running" or "stopped") or "not started"
  return string.format("<Cluster n=%d %s>", self.n, state)
end

local function timeout_of(self, timeout)
  return timeout or self.opts.timeout or 30
end

--- Start the engines (returns at once; they say hello shortly).
function Cluster:start()
  self.launcher.start(self, 2)
  return self
end

--- Wait until every engine is ready (raises naming those that are not).
function Cluster:wait_for_engines(timeout)
  local hub = self.launcher.hub(self, 2, "wait_for_engines")
  hub:wait_ready(self.launcher.ids(self), timeout_of(self, timeout), 2)
  return self
end

--- A Client of this cluster.
function Cluster:client()
  if self.launcher == Local and not self._hub then error("Cluster:client: start the cluster first", 2) end
  return Client.new(self.launcher.hub(self, 2, "client"))
end

--- Start, wait for every engine, and return a Client that owns the cluster.
function Cluster:start_and_connect(timeout)
  self.launcher.start(self, 2)
  local hub = self.launcher.hub(self, 2, "start_and_connect")
  hub:wait_ready(self.launcher.ids(self), timeout_of(self, timeout), 2)
  return Client.new(hub, self)
end

local function resolve_ids(self, ids)
  if ids == nil then return self.launcher.ids(self) end
  if math.type(ids) == "integer" then return { ids } end
  return ids
end

--- Kill (if running) and start again the given engines (default all), and
-- wait for them. Their globals are lost, as in ipyparallel.
function Cluster:restart_engines(ids, timeout)
  local hub = self.launcher.hub(self, 2, "restart_engines")
  hub:restart(resolve_ids(self, ids), self.n, timeout_of(self, timeout), 2)
  return self
end

--- Send a signal (number or name: "INT", "SIGKILL", ...) to engines.
function Cluster:signal_engines(sig, ids)
  local hub = self.launcher.hub(self, 2, "signal_engines")
  for _, id in ipairs(ids == nil and hub:ids() or resolve_ids(self, ids)) do hub:signal(id, sig) end
end

--- Stop every engine; their pending results fail with an EngineError.
-- A standalone cluster that is not running (any more) is left alone.
function Cluster:stop()
  self.launcher.stop(self)
end

-- A standalone cluster is stopped at scope exit or collection only when
-- this object started it (as ipyparallel's Cluster does at exit).
Cluster.__close = function(self)
  if self.launcher == Standalone and not self.started_pid then return end
  pcall(self.stop, self)
end

Cluster.__gc = function(self)
  self.launcher.finalize(self)
end

return Cluster
