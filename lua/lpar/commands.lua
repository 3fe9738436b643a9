--- `lpar cluster ...` and `lpar engine ...`: standalone clusters from the shell.
--   lpar cluster start [-n N] [--profile P] [--daemonize] [--ip ADDR] [--port PORT]
--   lpar cluster stop [--profile P | --all]
--   lpar cluster list
--   lpar cluster clean
--   lpar engine [--profile P | --file PATH]
-- Each returns a process exit status; messages go to stdout, errors to stderr.
local uv = require "luv"
local core = require "lpar.core"
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

--- Run the controller in this process until it is stopped.
local function run_controller(name, n, opts, ready_fd)
  local Controller = require "lpar.controller"
  local dir = profile.ensure_dir(name)
  local conn_path = dir .. "/" .. profile.CONNECTION_FILE
  local socket = dir .. "/controller.sock"
  os.remove(socket) -- a dead controller's; start checked that none is running
  local key = core.keygen()
  local stop_signals = function() end
  local stopped_why
  local ok, ctl = pcall(Controller.new, {
    n = n, socket = socket, ip = opts.ip, port = opts.port and port_number(opts.port),
    key = key, profile = name, pid = uv.os_getpid(),
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
  -- Every engine up, or one that did not come is named.
  local function settled()
    for id = 0, n - 1 do if ctl:engine(id).state == "starting" then return false end end
    return true
  end
  wait.until_done(settled, START_TIMEOUT)
  local missing = {}
  for id = 0, n - 1 do
    local e = ctl:engine(id)
    if e.state ~= "ready" then
      missing[#missing + 1] = string.format("engine %d %s", id, e.state == "dead"
        and string.format("exited (status %s, signal %s)", tostring(e.status), tostring(e.signal))
        or ("did not say hello within " .. START_TIMEOUT .. " s"))
    end
  end
  if #missing > 0 then
    ctl:close()
    local why = "the cluster did not come up: " .. table.concat(missing, "; ")
    announce(ready_fd, "error " .. why)
    return fail("%s", why)
  end
  profile.write(conn_path, {
    profile = name, socket = socket, ip = ctl.port and (opts.ip or "127.0.0.1") or nil, port = ctl.port,
    pid = uv.os_getpid(), engines = n, started = ctl.started, key = key,
  })
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
  uv.run("nowait") -- let the closed connections go
  print(string.format("lpar cluster %q: %s", name, stopped_why))
  return 0
end

--- The lpar command: this process when it is lpar, else the one this lpar
-- was built with (a script run by lua5.4 starting a cluster).
local function lpar_command()
  local exe = uv.exepath()
  if exe:match("/lpar$") then return exe end
  return core.command_path
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
  local words, eof = {}, false
  pipe:read_start(function(err, chunk)
    if err or not chunk then eof = true else words[#words + 1] = chunk end
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
  local n = positive(opts.n, "-n")
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
  local gone = wait.until_done(function() return not profile.alive(info.pid) end, 5)
  if not gone then
    uv.kill(info.pid, "sigterm")
    gone = wait.until_done(function() return not profile.alive(info.pid) end, 3)
    if not gone then uv.kill(info.pid, "sigkill") end
  end
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

local function cluster_list()
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
  for _, row in ipairs(rows) do
    local cells = {}
    for i, cell in ipairs(row) do cells[i] = cell .. string.rep(" ", widths[i] - #cell) end
    print((table.concat(cells, "  "):gsub("%s+$", "")))
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

--- An engine that joins a running cluster: a local lpar-engine, relayed to
-- the controller over its authenticated link (frames pass through as bytes;
-- the controller asks this engine for matrices inline).
local function engine_join(opts)
  local name = opts.file == nil and profile.check_name(opts.profile or "default") or nil
  local info = profile.read(opts.file or profile.connection_file(name), name)
  -- What the controller tells of its other engines is not this relay's business.
  local relay = { ready = function() end, exit = function() end }
  local joined, cluster, done, status = nil, nil, false, 0
  local link, err = remote.first_reachable(info, function(address)
    local answered, closed = false, nil
    relay.control = function(_, answer, why) answered, joined = true, answer or why end
    relay.closed = function(reason) closed = reason end
    local l, cerr = core.connect { path = address.path, host = address.host, port = address.port,
                                   key = info.key, raw = true, handler = function(kind, ...) relay[kind](...) end }
    if not l then return nil, cerr end
    l:send(0, core.CONTROL, 1, "join", "join")
    wait.until_done(function() return answered or closed end, 10)
    if type(joined) == "table" then return l end
    l:stop()
    return nil, closed or tostring(joined or "the controller did not answer 'join'")
  end)
  if not link then return fail("cannot reach the cluster in %s: %s", info.file, err) end
  local id = joined.id
  function relay.frame(_, mtype, flags, mid, payload)
    if mtype == core.SIGNAL then
      cluster:signal(id, tonumber(payload))
    elseif mtype == core.INTERRUPT then
      cluster:interrupt(id, mid)
    elseif mtype ~= core.HELLO and mtype ~= core.EXIT then
      cluster:send_bytes(id, mtype, flags, mid, payload)
    end
  end
  function relay.closed(reason)
    if not done then io.stderr:write("lpar engine: the controller went away: ", reason, "\n") end
    done = true
  end
  local engine = {}
  function engine.ready(_, hello)
    print(string.format("lpar engine: engine %d joined the cluster in %s", id, info.file))
    io.stdout:flush()
    link:send_bytes(0, core.HELLO, core.FLAG_RAW, 0, hello)
  end
  function engine.frame(_, mtype, flags, mid, payload)
    link:send_bytes(0, mtype, flags, mid, payload)
  end
  function engine.exit(_, st, sig)
    link:send_bytes(0, core.EXIT, core.FLAG_RAW, 0, string.format("%d %d", st, sig))
    done, status = true, st == 0 and 0 or 1
  end
  function engine.bad() end
  cluster = core.new_cluster { raw = true, handler = function(kind, ...) engine[kind](...) end }
  local pid, serr = cluster:spawn(id, joined.n)
  if not pid then
    io.stderr:write("lpar engine: cannot start lpar-engine: ", tostring(serr), "\n")
    link:send_bytes(0, core.EXIT, core.FLAG_RAW, 0, "127 0")
    done, status = true, 1
  end
  local stop_signals = on_signals({ "sigint", "sigterm" }, function() done = true end)
  while not done do uv.run("once") end
  stop_signals()
  cluster:stop()
  link:stop()
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
