--- Launchers: how a standalone controller's engines start.
--   local  the controller's own children (core/relay.c spawns them)
--   ssh    `lpar engine -n K` on each host over ssh, one link per host
--   mpi    `lpar engine --rank` per rank under mpiexec: engine id = rank
--   slurm  the same under srun: engine id = task rank
-- Remote engines connect back to the controller's TCP address and join
-- (Controller:op_join) with the ids the launcher planned, host by host or
-- by rank, so ids come in a stable order. The key never goes on a command
-- line or in an environment: ssh hands the connection info over on the
-- remote command's standard input, mpi and slurm ranks read the 0600
-- connection file (a shared path, as ipyparallel does).
local uv = require "luv"
local profile = require "lpar.profile"
local wait = require "lpar.wait"

local launchers = {}

launchers.NAMES = { ["local"] = true, ssh = true, mpi = true, slurm = true }

-- How much of a launcher process's output is kept to name what went wrong.
local KEEP_OUTPUT = 4096

local function words(text)
  local list = {}
  for w in tostring(text):gmatch("%S+") do list[#list + 1] = w end
  return list
end

--- "host[:K],host[:K]" (or a list of such strings) -> { { host =, count = K or nil } }.
function launchers.parse_hosts(spec)
  local items = type(spec) == "table" and spec or {}
  if type(spec) == "string" then
    for item in spec:gmatch("[^,%s]+") do items[#items + 1] = item end
  end
  local hosts = {}
  for _, item in ipairs(items) do
    local host, k = tostring(item):match("^([^:]+):(%d+)$")
    host = host or tostring(item)
    if not host:match("^[%w_.@%-]+$") then
      error(string.format("bad host %q: use NAME or NAME:K (K engines there)", host), 0)
    end
    local count = k and math.tointeger(tonumber(k))
    if count and count < 1 then error(string.format("host %s: K must be at least 1", host), 0) end
    hosts[#hosts + 1] = { host = host, count = count }
  end
  if #hosts == 0 then error("no hosts given (--hosts HOST[:K],... or --hostfile FILE)", 0) end
  return hosts
end

--- A hostfile: one host per line, "HOST", "HOST:K" or "HOST slots=K"; # comments.
function launchers.read_hostfile(path)
  local f, err = io.open(path, "r")
  if not f then error("cannot read the hostfile: " .. tostring(err), 0) end
  local items = {}
  for line in f:lines() do
    line = line:gsub("#.*", "")
    local host, slots = line:match("^%s*(%S+)%s+slots=(%d+)")
    if host then items[#items + 1] = host .. ":" .. slots
    elseif line:match("%S") then items[#items + 1] = line:match("%S+") end
  end
  f:close()
  return launchers.parse_hosts(items)
end

--- Engines per host, and their first ids, host by host: hosts with a K get
-- K, the others share what is left of n evenly (the first ones one more).
-- n nil: the sum of the Ks. Returns the plan and n.
function launchers.plan(hosts, n)
  local fixed, free = 0, 0
  for _, h in ipairs(hosts) do
    if h.count then fixed = fixed + h.count else free = free + 1 end
  end
  n = n or (free == 0 and fixed) or nil
  if not n then error("-n is needed when a host has no :K", 0) end
  local left = n - fixed
  if left < 0 or (free == 0 and left ~= 0) or (free > 0 and left < free) then
    error(string.format("%d engines cannot be placed on these hosts (%d fixed by :K, %d hosts without)",
      n, fixed, free), 0)
  end
  local plan, first, i = {}, 0, 0
  for _, h in ipairs(hosts) do
    local count = h.count
    if not count then
      count = left // free + (i < left % free and 1 or 0)
      i = i + 1
    end
    plan[#plan + 1] = { host = h.host, first = first, count = count }
    first = first + count
  end
  return plan, n
end

local function shell_quote(s)
  if s:match("^[%w_./:=@%-]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

--- This environment with `extra` ("NAME=value" strings) added, for uv.spawn.
local function environment(extra)
  local env = {}
  for k, v in pairs(uv.os_environ()) do env[#env + 1] = k .. "=" .. v end
  for _, e in ipairs(extra or {}) do env[#env + 1] = e end
  return env
end

-- ---- a job: the processes a launcher started ----

local Job = {}
Job.__index = Job

--- Start `cmd args` for engines first .. first + count - 1 on `host`;
-- `input` goes to its standard input, which is then closed. Its output
-- goes to this process's stderr (the controller's log), lines prefixed.
function Job:spawn(host, first, count, cmd, args, input, env)
  local proc = { host = host, first = first, count = count, output = "", cmd = cmd }
  local stdin, out, err = uv.new_pipe(false), uv.new_pipe(false), uv.new_pipe(false)
  local handle, pid = uv.spawn(cmd, { args = args, stdio = { stdin, out, err }, env = env },
    function(status, signal)
      proc.exited, proc.status, proc.signal = true, status, signal
    end)
  if not handle then
    stdin:close()
    out:close()
    err:close()
    proc.exited, proc.status, proc.signal, proc.output = true, 127, 0, "cannot run " .. cmd .. ": " .. tostring(pid)
    self.procs[#self.procs + 1] = proc
    return proc
  end
  proc.handle, proc.pid = handle, pid
  for _, pipe in ipairs { out, err } do
    pipe:read_start(function(rerr, chunk)
      if rerr or not chunk then
        pipe:read_stop()
        if not pipe:is_closing() then pipe:close() end
        return
      end
      proc.output = (proc.output .. chunk):sub(-KEEP_OUTPUT)
      io.stderr:write((chunk:gsub("([^\n]*)\n", "[" .. host .. "] %1\n")))
      io.stderr:flush()
    end)
  end
  stdin:write(input or "")
  stdin:shutdown(function() if not stdin:is_closing() then stdin:close() end end)
  self.procs[#self.procs + 1] = proc
  return proc
end

--- The process that starts engine `id`, if any.
function Job:process_of(id)
  for _, p in ipairs(self.procs) do
    if id >= p.first and id < p.first + p.count then return p end
  end
end

--- What a process that ended said, for the user.
function Job.describe(proc)
  local how = proc.signal and proc.signal > 0 and ("was killed by signal " .. proc.signal)
    or ("exited with status " .. tostring(proc.status))
  local said = proc.output:gsub("%s+$", "")
  return string.format("host %s (engines %d..%d): %s %s%s", proc.host, proc.first, proc.first + proc.count - 1,
    proc.cmd, how, said ~= "" and (": " .. said:gsub("\n", " | ")) or "")
end

--- Let the processes end (their engines' links closed), then insist.
function Job:stop(grace)
  local function all_done()
    for _, p in ipairs(self.procs) do if not p.exited then return false end end
    return true
  end
  wait.until_done(all_done, grace or 1)
  for _, p in ipairs(self.procs) do
    if not p.exited and p.handle then p.handle:kill("sigterm") end
  end
  wait.until_done(all_done, 2)
  for _, p in ipairs(self.procs) do
    if not p.exited and p.handle then p.handle:kill("sigkill") end
    if p.handle and not p.handle:is_closing() then p.handle:close() end
  end
  uv.run("nowait")
end

local function new_job()
  return setmetatable({ procs = {} }, Job)
end

-- ---- the launchers ----

--- opts: n, hosts (parsed), ssh_command, remote_command, lpar (this lpar's
-- path), info (ip, port, key, profile: what the engines connect to),
-- mem_limit (bytes, passed on as `lpar engine --mem-limit`).
function launchers.ssh(opts)
  local plan = launchers.plan(opts.hosts, opts.n)
  local ssh = words(opts.ssh_command or "ssh")
  local remote = opts.remote_command or opts.lpar
  local input = profile.format { profile = opts.info.profile, ip = opts.info.ip, port = opts.info.port,
                                 key = opts.info.key }
  local job = new_job()
  for _, p in ipairs(plan) do
    local command = string.format("%s engine --stdin -n %d --id %d --host-name %s%s", shell_quote(remote),
      p.count, p.first, shell_quote(p.host), opts.mem_limit and (" --mem-limit " .. opts.mem_limit) or "")
    local args = {}
    for i = 2, #ssh do args[#args + 1] = ssh[i] end
    args[#args + 1] = p.host
    args[#args + 1] = command
    job:spawn(p.host, p.first, p.count, ssh[1], args, input)
  end
  return job
end

local function cores()
  local f = io.open("/proc/cpuinfo", "r")
  local n = 0
  if f then
    for line in f:lines() do if line:match("^processor") then n = n + 1 end end
    f:close()
  end
  return math.max(n, 1)
end

--- Ranks under `mpiexec` (or `srun`), each `lpar engine --rank`, reading
-- the connection file (opts.connection_file). opts: n, lpar, mpiexec_args, mem_limit;
-- for mpi also hosts (mpiexec --host) and ssh_command (its plm_rsh_agent).
local function ranked(launcher, opts)
  local job = new_job()
  local args, env = { "-n", tostring(opts.n) }, nil
  if launcher == "mpi" then
    -- OpenMPI refuses root unless told twice, and more ranks than cores unless told.
    if uv.getuid() == 0 then
      env = environment { "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" }
    end
    if opts.n > cores() then args[#args + 1] = "--oversubscribe" end
    -- The ssh launcher's options mean the same here: which hosts, and how to reach them.
    if opts.hosts then
      local list = {}
      for _, p in ipairs(launchers.plan(opts.hosts, opts.n)) do list[#list + 1] = p.host .. ":" .. p.count end
      args[#args + 1] = "--host"
      args[#args + 1] = table.concat(list, ",")
    end
    if opts.ssh_command then
      for _, w in ipairs { "--mca", "plm_rsh_agent", opts.ssh_command } do args[#args + 1] = w end
    end
  end
  for _, w in ipairs(words(opts.mpiexec_args or "")) do args[#args + 1] = w end
  for _, w in ipairs { opts.lpar, "engine", "--file", opts.connection_file, "--rank" } do args[#args + 1] = w end
  if opts.mem_limit then args[#args + 1] = "--mem-limit"; args[#args + 1] = tostring(opts.mem_limit) end
  job:spawn(uv.os_gethostname(), 0, opts.n, launcher == "mpi" and "mpiexec" or "srun", args, "", env)
  return job
end

function launchers.mpi(opts) return ranked("mpi", opts) end
function launchers.slurm(opts) return ranked("slurm", opts) end

return launchers
