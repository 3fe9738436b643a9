--- `lpar cluster ...` and `lpar engine ...`: standalone clusters from the shell.
--   lpar cluster start [-n N] [--profile P] [--daemonize] [--ip ADDR] [--port PORT] [--mem-limit SIZE]
--   lpar cluster stop [--profile P | --all]
--   lpar cluster list
--   lpar cluster clean
--   lpar engine [--profile P | --file PATH | --stdin] [-n K] [--id FIRST | --rank] [--host-name NAME]
--               [--mem-limit SIZE]
-- Each returns a process exit status; messages go to stdout, errors to stderr.
local uv = require "luv"
local core = require "lpar.core"
local opts_lib = require "lpar.options"
local profile = require "lpar.profile"
local remote = require "lpar.remote"
local wait = require "lpar.wait"

local commands = {}

local START_TIMEOUT = 30

local function fail(fmt, ...)
  io.stderr:write("lpar: ", string.format(fmt, ...), "\n")
  return 1
end

local function port_number(text)
  local n = math.tointeger(tonumber(text))
  if not n or n < 0 or n > 65535 then
    error(string.format("--port must be 0 (any free port) to 65535, not '%s'", text), 0)
  end
  return n
end

--- The engines' environment for a --mem-limit (nil without one).
local function mem_limit_env(text)
  if text == nil then return nil end
  return { "LPAR_MEM_LIMIT=" .. opts_lib.mem_limit(text, "--mem-limit", 0) }
end

local function positive(text, what)
  local n = math.tointeger(tonumber(text))
  if not n or n < 1 then error(string.format("%s must be a positive integer, not '%s'", what, text), 0) end
  return n
end

--- Run `fn(name)` on each of the named signals (luv names: "sigint") until
-- the returned function is called.
local function on_signals(names, fn)
  local handles = {}
  for _, name in ipairs(names) do
    local s = uv.new_signal()
    s:start(name, function() fn(name) end)
    handles[#handles + 1] = s
  end
  return function()
    -- Stopped and unref'd, not closed: luv 1.44 crashes at exit on a half-closed handle.
    for _, s in ipairs(handles) do s:stop() s:unref() end
  end
end

-- ---- cluster start ----

local function announce(ready_fd, text)
  if ready_fd then
    uv.fs_write(ready_fd, text .. "\n")
    uv.fs_close(ready_fd)
  end
end

--- The lpar command: this process when it is lpar, else the one this lpar
-- was built with (a script run by lua5.4 starting a cluster).
local function lpar_command()
  local exe = uv.exepath()
  if exe:match("/lpar$") then return exe end
  return core.command_path
end

--- Start the engines elsewhere with launcher `opts.launcher`; the job.
local function launch(opts, n, info, conn_path)
  local launchers = require "lpar.launchers"
  local hosts = opts.hosts
  return launchers[opts.launcher] {
    n = n, hosts = hosts, ssh_command = opts.ssh_command, remote_command = opts.remote_command,
    lpar = lpar_command(), info = info, connection_file = conn_path, mpiexec_args = opts.mpiexec_args,
    mem_limit = opts.mem_limit and opts_lib.mem_limit(opts.mem_limit, "--mem-limit", 0),
  }
end

--- Run the controller in this process until it is stopped.
local function run_controller(name, n, opts, ready_fd)
  local Controller = require "lpar.controller"
  local launcher = opts.launcher or "local"
  local dir = profile.ensure_dir(name)
  local conn_path = dir .. "/" .. profile.CONNECTION_FILE
  local socket = dir .. "/controller.sock"
  os.remove(socket) -- a dead controller's; start checked that none is running
  local key = core.keygen()
  local stop_signals = function() end
  local stopped_why
  local ok, ctl = pcall(Controller.new, {
    n = n, socket = socket, ip = opts.ip, port = opts.port and port_number(opts.port),
    key = key, profile = name, pid = uv.os_getpid(), launcher = launcher,
    engine_env = mem_limit_env(opts.mem_limit),
    on_stop = function(why)
      stopped_why = why
      os.remove(conn_path)
      os.remove(socket)
      stop_signals()
    end,
  })
  if not ok then
    announce(ready_fd, "error " .. tostring(ctl))
    return fail("cannot start cluster %q: %s", name, tostring(ctl))
  end
  local conn_info = {
    profile = name, socket = socket, ip = ctl.port and (opts.ip or "127.0.0.1") or nil, port = ctl.port,
    pid = uv.os_getpid(), engines = n, started = ctl.started, key = key,
  }
  local job
  if launcher ~= "local" then
    -- MPI and Slurm ranks read the connection file: it must be there first.
    if launcher ~= "ssh" then profile.write(conn_path, conn_info) end
    local lok, j = pcall(launch, opts, n, conn_info, conn_path)
    if not lok then
      ctl:close()
      os.remove(conn_path)
      announce(ready_fd, "error " .. tostring(j))
      return fail("cannot start cluster %q: %s", name, tostring(j))
    end
    job = j
  end
  -- Every engine up, or one that did not come is named (and, started
  -- elsewhere, the host and what its launcher said).
  local function pending(id)
    local e = ctl:engine(id)
    if e and e.state ~= "starting" then return false end
    local proc = job and job:process_of(id)
    return not (proc and proc.exited)
  end
  local function settled()
    for id = 0, n - 1 do if pending(id) then return false end end
    return true
  end
  wait.until_done(settled, START_TIMEOUT)
  local missing, named = {}, {}
  for id = 0, n - 1 do
    local e = ctl:engine(id)
    local proc = job and job:process_of(id)
    if e and e.state == "dead" then
      missing[#missing + 1] = string.format("engine %d%s exited (status %s, signal %s)", id,
        proc and (" on host " .. proc.host) or "", tostring(e.status), tostring(e.signal))
    elseif proc and proc.exited and not (e and e.state == "ready") then
      if not named[proc] then missing[#missing + 1], named[proc] = job.describe(proc), true end
    elseif not (e and e.state == "ready") then
      missing[#missing + 1] = string.format("engine %d%s did not say hello within %d s", id,
        proc and (" on host " .. proc.host) or "", START_TIMEOUT)
    end
  end
  if #missing > 0 then
    ctl:close()
    if job then job:stop(1) end
    os.remove(conn_path)
    local why = "the cluster did not come up: " .. table.concat(missing, "; ")
    announce(ready_fd, "error " .. why)
    return fail("%s", why)
  end
  profile.write(conn_path, conn_info)
  local address = socket .. (ctl.port and string.format(" and %s:%d", opts.ip or "127.0.0.1", ctl.port) or "")
  announce(ready_fd, string.format("ready %d %s", uv.os_getpid(), address))
  print(string.format("lpar cluster %q: %d engines ready, controller pid %d, listening on %s\n" ..
    "connection file: %s", name, n, uv.os_getpid(), address, conn_path))
  io.stdout:flush()
  stop_signals = on_signals({ "sigint", "sigterm", "sighup" }, function(signame)
    ctl:stop("stopped by " .. signame:upper())
  end)
  -- The relay moves messages in C; this loop only wakes for them and sleeps in epoll otherwise.
  while not stopped_why do uv.run("once") end
  ctl:close()
  if job then job:stop() end
  uv.run("nowait") -- let the closed connections go
  print(string.format("lpar cluster %q: %s", name, stopped_why))
  return 0
end

--- Start a controller as a daemon, and wait for its word on a pipe: its pid
-- and address, or nil and what went wrong. `args`: options for `cluster start`.
function commands.start_daemon(name, args)
  local dir = profile.ensure_dir(name)
  local log_path = dir .. "/controller.log"
  local log = assert(uv.fs_open(log_path, "w", tonumber("600", 8)))
  local null = assert(uv.fs_open("/dev/null", "r", 0))
  local pipe = uv.new_pipe(false)
  local child_args = { "cluster", "start", "--ready-fd", "3", "--profile", name }
  for _, a in ipairs(args) do child_args[#child_args + 1] = a end
  local handle, pid = uv.spawn(lpar_command(), {
    args = child_args, stdio = { null, log, log, pipe }, detached = true,
  }, function() end)
  uv.fs_close(log)
  uv.fs_close(null)
  if not handle then return nil, "cannot start the controller: " .. tostring(pid) end
  handle:unref()
  -- Its word is one line: engines it launched may hold the pipe open after it.
  local words, eof = {}, false
  pipe:read_start(function(err, chunk)
    if err or not chunk then eof = true else words[#words + 1] = chunk end
    if chunk and chunk:find("\n") then eof = true end
  end)
  wait.until_done(function() return eof end, START_TIMEOUT + 5)
  pipe:read_stop()
  -- Close both handles and let the loop finish closing them: luv 1.44
  -- crashes at exit on a half-closed handle.
  pipe:close()
  handle:close()
  uv.run("nowait")
  local said = table.concat(words):gsub("\n$", "")
  local rpid, address = said:match("^ready (%d+) (.*)$")
  if rpid then return math.tointeger(tonumber(rpid)), address end
  if said == "" then
    return nil, string.format("the controller (pid %d) ended before its engines were ready; see %s",
      pid, log_path)
  end
  return nil, (said:gsub("^error ", ""))
end

local function daemonize(name, args)
  local options, i = {}, 3
  while i <= #args do -- all but --daemonize, and --profile, which start_daemon adds
    if args[i] == "--profile" then
      i = i + 1
    elseif args[i] ~= "--daemonize" then
      options[#options + 1] = args[i]
    end
    i = i + 1
  end
  local pid, address = commands.start_daemon(name, options)
  if not pid then return fail("%s", address) end
  print(string.format("lpar cluster %q: ready, controller pid %d, listening on %s\nconnection file: %s",
    name, pid, address, profile.connection_file(name)))
  return 0
end

local function cluster_start(opts, args)
  local name = profile.check_name(opts.profile)
  local launchers = require "lpar.launchers"
  local launcher = opts.launcher or "local"
  if not launchers.NAMES[launcher] then
    error(string.format("--launcher must be local, ssh, mpi or slurm, not '%s'", launcher), 0)
  end
  local n = opts.n and positive(opts.n, "-n")
  mem_limit_env(opts.mem_limit) -- a bad size fails here, not in the daemon's log
  if launcher == "ssh" or (launcher == "mpi" and (opts.hosts or opts.hostfile)) then
    opts.hosts = opts.hostfile and launchers.read_hostfile(opts.hostfile) or launchers.parse_hosts(opts.hosts or "")
    local _, total = launchers.plan(opts.hosts, n)
    n = total
  end
  if launcher ~= "local" and not opts.ip and not opts.port and launcher == "ssh" then opts.ip = "127.0.0.1" end
  if opts.ip and not opts.port then opts.port = "0" end
  n = n or 4
  local conn = profile.connection_file(name)
  local ok, info = pcall(profile.read, conn, name)
  if ok and profile.alive(info.pid) then
    return fail("cluster %q is already running (controller pid %d); stop it with " ..
      "`lpar cluster stop --profile %s`", name, info.pid, name)
  end
  if ok then profile.remove_files(name) end -- a dead cluster's leftovers
  if opts.daemonize then return daemonize(name, args) end
  return run_controller(name, n, opts, opts.ready_fd and positive(opts.ready_fd, "--ready-fd"))
end

-- ---- cluster stop / list / clean ----

--- Stop cluster `name`: ask its controller, then insist. Returns a message
-- saying what was done; raises when there is no such cluster.
function commands.stop_cluster(name)
  local info = profile.read(profile.connection_file(name), name)
  if not profile.alive(info.pid) then
    profile.remove_files(name)
    return string.format("cluster %q was not running (pid %d is gone); removed its stale files", name, info.pid)
  end
  remote.ask(info, "shutdown")
  -- Nothing else may keep the loop running while we wait (a wait on an
  -- empty loop returns at once): a ticking timer looks again every 10 ms.
  local tick = uv.new_timer()
  tick:start(10, 10, function() end)
  local function gone_within(seconds)
    return wait.until_done(function() return not profile.alive(info.pid) end, seconds)
  end
  -- A controller stops its engines elsewhere first (their links close, its launcher's processes end).
  if not gone_within(8) then
    uv.kill(info.pid, "sigterm")
    if not gone_within(3) then uv.kill(info.pid, "sigkill") end
  end
  tick:stop()
  tick:close()
  uv.run("nowait")
  profile.remove_files(name)
  return string.format("stopped cluster %q (controller pid %d)", name, info.pid)
end

local function stop_one(name)
  if not uv.fs_stat(profile.connection_file(name)) then
    return fail("no cluster with profile %q is running (there is no %s)", name, profile.connection_file(name))
  end
  local ok, said = pcall(commands.stop_cluster, name)
  if not ok then return fail("%s", said) end
  print(said)
  return 0
end

local function cluster_stop(opts)
  if opts.all then
    local status = 0
    for _, name in ipairs(profile.list()) do status = math.max(status, stop_one(name)) end
    return status
  end
  return stop_one(profile.check_name(opts.profile))
end

local function duration(seconds)
  seconds = math.floor(seconds)
  if seconds < 60 then return seconds .. "s" end
  if seconds < 3600 then return string.format("%dm%02ds", seconds // 60, seconds % 60) end
  return string.format("%dh%02dm", seconds // 3600, seconds % 3600 // 60)
end

--- Under a cluster's row, one line per host: its engines, their states and pids.
local function hosts_lines(engines)
  local by_host, order = {}, {}
  for id = 0, math.huge do
    local e = engines[id]
    if not e then break end
    local host = e.host or "?"
    if not by_host[host] then by_host[host], order[#order + 1] = {}, host end
    local list = by_host[host]
    list[#list + 1] = string.format("%d (%s, pid %s)", id, e.state, tostring(e.pid))
  end
  local lines = {}
  for _, host in ipairs(order) do
    lines[#lines + 1] = "  host " .. host .. ": engines " .. table.concat(by_host[host], ", ")
  end
  return lines
end

local function cluster_list()
  local engine_lines = {}
  local rows = { { "PROFILE", "PID", "ENGINES", "ADDRESS", "UPTIME", "REFUSED" } }
  for _, name in ipairs(profile.list()) do
    local ok, info = pcall(profile.read, profile.connection_file(name), name)
    if not ok then
      rows[#rows + 1] = { name, "-", "-", "unreadable: " .. tostring(info), "-", "-" }
    elseif not profile.alive(info.pid) then
      rows[#rows + 1] = { name, tostring(info.pid), "-", "stale (run `lpar cluster clean`)", "-", "-" }
    else
      local st = remote.ask(info, "status")
      local address = info.socket .. (info.port and string.format(" %s:%d", info.ip, info.port) or "")
      if st then
        local ready, total, silent = 0, 0, 0
        for _, e in pairs(st.engines) do
          total = total + 1
          if e.state == "ready" then ready = ready + 1 end
          if e.state == "not responding" then silent = silent + 1 end
        end
        local count = string.format("%d/%d", ready, total)
        if silent > 0 then count = count .. string.format(" (%d not responding)", silent) end
        rows[#rows + 1] = { name, tostring(info.pid), count, address,
          duration(st.uptime), string.format("%d (%d cut off)", st.refused, st.disconnected) }
        engine_lines[#rows] = hosts_lines(st.engines)
      else
        rows[#rows + 1] = { name, tostring(info.pid), "?", address .. " (not answering)", "-", "-" }
      end
    end
  end
  if #rows == 1 then
    print("no clusters in " .. profile.base())
    return 0
  end
  local widths = {}
  for _, row in ipairs(rows) do
    for i, cell in ipairs(row) do widths[i] = math.max(widths[i] or 0, #cell) end
  end
  for r, row in ipairs(rows) do
    local cells = {}
    for i, cell in ipairs(row) do cells[i] = cell .. string.rep(" ", widths[i] - #cell) end
    print((table.concat(cells, "  "):gsub("%s+$", "")))
    for _, line in ipairs(engine_lines[r] or {}) do print(line) end
  end
  return 0
end

local function cluster_clean()
  local removed = 0
  for _, name in ipairs(profile.list()) do
    local ok, info = pcall(profile.read, profile.connection_file(name), name)
    if not ok or not profile.alive(info.pid) then
      for _, f in ipairs(profile.remove_files(name)) do
        print("removed " .. f)
        removed = removed + 1
      end
    end
  end
  if removed == 0 then print("nothing to clean in " .. profile.base()) end
  return 0
end

-- ---- engine ----

--- The engine id an MPI or Slurm launcher gave this process: its rank.
local function rank_from_environment()
  for _, name in ipairs { "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID" } do
    local v = math.tointeger(tonumber(os.getenv(name) or ""))
    if v then return v end
  end
  error("--rank: no rank in the environment (OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK, SLURM_PROCID)", 0)
end

--- The connection info: from standard input (as a launcher hands it over,
-- so the key is never in a command line or an environment), or a file.
local function engine_info(opts)
  if opts.stdin then
    local text = io.stdin:read("a")
    if not text or text == "" then error("--stdin: nothing came on standard input", 0) end
    return profile.parse(text, "standard input")
  end
  local name = opts.file == nil and profile.check_name(opts.profile or "default") or nil
  return profile.read(opts.file or profile.connection_file(name), name)
end

--- Connect to the controller and join with `count` engines; the link and
-- the controller's answer { id = first, n = }, or nil and why.
local function join_link(info, relay, want)
  return remote.first_reachable(info, function(address)
    local answered, closed, joined = false, nil, nil
    relay.control = function(_, answer, why) answered, joined = true, answer or why end
    relay.closed = function(reason) closed = reason end
    local l, cerr = core.connect { path = address.path, host = address.host, port = address.port,
                                   key = info.key, raw = true, handler = function(kind, ...) relay[kind](...) end }
    if not l then return nil, cerr end
    l:send(0, core.CONTROL, 1, "join", "join", want)
    wait.until_done(function() return answered or closed end, 10)
    if type(joined) == "table" then return l, joined end
    l:stop()
    return nil, closed or tostring(joined or "the controller did not answer 'join'")
  end)
end

--- Engines that join a running cluster: K local lpar-engines (ids first ..
-- first + K - 1) behind one relay, over one authenticated link to the
-- controller, the route field naming each by its index. Once joined, the
-- link belongs to the host relay (core/hostrelay.c), which moves every frame
-- in C, answers the controller's heartbeats, hands a request for several
-- engines to each by shared memory, and stops when nothing was heard from the
-- controller for 5 s; Lua hears only engines coming and going, and the link.
local function engine_join(opts)
  local count = positive(opts.n or "1", "-n")
  local env = mem_limit_env(opts.mem_limit)
  local info = engine_info(opts)
  local first = opts.rank and rank_from_environment() or (opts.id and math.tointeger(tonumber(opts.id)))
  if opts.id and not first then error(string.format("--id must be an integer, not '%s'", opts.id), 0) end
  local host = opts.host_name or uv.os_gethostname()
  -- What the controller tells of its other engines is not this relay's business.
  local relay = { ready = function() end, exit = function() end, frame = function() end }
  local link, joined = join_link(info, relay, { count = count, id = first, host = host })
  if not link then return fail("cannot reach the cluster in %s: %s", info.file, joined) end
  first = joined.id
  local done, status, alive = false, 0, count
  local events = {}
  function events.ready(id)
    print(string.format("lpar engine: engine %d joined the cluster in %s", id, info.file))
    io.stdout:flush()
  end
  function events.exit(_, st)
    if st ~= 0 then status = 1 end
    alive = alive - 1
    if alive == 0 then done = true end
  end
  function events.closed(reason, silent)
    if silent then
      if not done then io.stderr:write("lpar engine: ", reason, "; stopping\n") end
      status = 1
    elseif not done then
      io.stderr:write("lpar engine: the controller went away: ", reason, "\n")
    end
    done = true
  end
  -- An MPI rank's engine starts MPI as it starts (lpar.mpi; engines/engine.c).
  local mpi = opts.rank and (os.getenv("OMPI_COMM_WORLD_RANK") or os.getenv("PMIX_RANK") or os.getenv("PMI_RANK"))
  if mpi then
    env = env or {}
    env[#env + 1] = "LPAR_MPI=1"
  end
  local hr, herr = core.host_relay { link = link, first = first, count = count, n = joined.n, host = host,
                                     env = env,
                                     handler = function(kind, ...) events[kind](...) end }
  link:stop()
  if not hr then return fail("cannot relay for the cluster in %s: %s", info.file, herr) end
  for index = 0, count - 1 do
    local ok, serr = hr:spawn(index)
    if not ok then
      io.stderr:write("lpar engine: cannot start lpar-engine: ", tostring(serr), "\n")
      events.exit(first + index, 127, 0)
    end
  end
  local stop_signals = on_signals({ "sigint", "sigterm", "sighup" }, function() done = true end)
  while not done do uv.run("once") end
  stop_signals()
  hr:stop()
  uv.run("nowait")
  return status
end

local ACTIONS = { start = cluster_start, stop = cluster_stop, list = cluster_list, clean = cluster_clean }

--- Run one command, parsed by lpar.cli: `opts` from argparse (`command`,
-- `action` and the options), `args` as given. Returns its exit status.
function commands.run(opts, args)
  local ok, status = pcall(function()
    if opts.command == "engine" then return engine_join(opts) end
    if opts.command == "kernel" then return require("lpar.kernelspec").main(opts) end
    return ACTIONS[opts.action](opts, args)
  end)
  if not ok then return fail("%s", tostring(status)) end
  return status
end

return commands
