--- The `lpar` command line, parsed with argparse, by lua5.4's conventions:
--   lpar [options] [script [args...]]
--   lpar cluster start|stop|list|clean [options]
--   lpar engine [options]
-- Options come before the script, in any order; everything after the script
-- (or after `--`) is the script's. `-` runs standard input as the script.
-- `--help`/`-h` prints to stdout and exits 0; a mistake exits 2, naming it.
local argparse = require "argparse"

local cli = {}

local DESCRIPTION = "Interactive parallel computing for Lua 5.4: run a script, a chunk or the " ..
  "prompt with lpar on the path, optionally on a cluster of engines."

local EPILOG = [[
Commands:
   lpar cluster start|stop|list|clean   standalone clusters (lpar cluster --help)
   lpar engine                          an engine that joins a standalone cluster

With -n or --profile, the script, the chunks and the prompt see `rc`, the
Client, and `dview`, a blocking view of all its engines.
Environment: LPAR_DIR, LPAR_ENGINE, LPAR_COMMAND, LPAR_LUA_DIR, LPAR_CMOD_DIR,
LPAR_OUTPUT_DIR, LPAR_NO_AES (see lpar(1)).]]

--- Options that take a value (the rest are flags), to find where the script starts.
local VALUED = { ["-n"] = true, ["-e"] = true, ["-l"] = true, ["--profile"] = true }

--- The parser of the main command; `steps` collects -e and -l in their order.
local function main_parser(steps)
  local version = require("lpar.core").version
  local p = argparse("lpar", DESCRIPTION, EPILOG)
  p:usage("Usage: lpar [-h] [-v] [-n N] [--profile P] [-e STAT] [-l MOD] [-i] [script [args...]]")
  p:flag("-v --version", "Print lpar's version and exit."):action(function()
    print("lpar " .. version .. " (" .. _VERSION .. ")")
    os.exit(0)
  end)
  p:option("-n", "Start N local engines first (1 to 4096)."):argname("N")
    :convert(function(s)
      local n = math.tointeger(tonumber(s))
      if not n or n < 1 or n > 4096 then return nil, "-n needs a number of engines from 1 to 4096" end
      return n
    end)
  p:option("--profile", "Connect to the standalone cluster of profile P first."):argname("P")
  p:option("-e", "Run the chunk STAT (repeatable)."):argname("STAT"):count("*")
    :action(function(_, _, v) steps[#steps + 1] = { "e", v } end)
  p:option("-l", "Require module MOD into the global MOD (repeatable)."):argname("MOD"):count("*")
    :action(function(_, _, v) steps[#steps + 1] = { "l", v } end)
  p:flag("-i", "Enter the prompt after running the script or the chunks.")
  return p
end

--- The parser of `lpar cluster ...`, `lpar engine ...` and `lpar kernel ...`.
local function command_parser()
  local p = argparse("lpar", "Standalone clusters: start, stop, list and clean them, or join one.")
  p:command_target("command")
  local cluster = p:command("cluster", "Manage standalone clusters (a controller and its engines).")
  cluster:command_target("action")
  local start = cluster:command("start", "Start a controller and its engines.")
  start:option("-n", "Number of engines (default 4; with --hosts, as the hosts say)."):argname("N")
  start:option("--profile", "Profile name."):argname("P"):default("default")
  start:flag("--daemonize", "Run in the background; return once the engines are ready.")
  start:option("--ip", "Also listen on TCP at this address (127.0.0.1 with --port alone)."):argname("ADDR")
  start:option("--port", "TCP port (0: any free port)."):argname("PORT")
  start:option("--ready-fd", "(internal) Descriptor to announce readiness on."):argname("FD"):hidden(true)
  start:option("--launcher", "How engines start: local, ssh, mpi or slurm."):argname("L"):default("local")
  start:option("--hosts", "ssh (and mpi) hosts, HOST[:K],HOST[:K] (K engines each)."):argname("HOSTS")
  start:option("--hostfile", "A file of hosts, one HOST[:K] a line."):argname("FILE")
  start:option("--ssh-command", "The ssh command (default ssh), e.g. 'ssh -F cfg'."):argname("CMD")
  start:option("--remote-command", "The lpar command on the hosts (default: this one's path)."):argname("PATH")
  start:option("--mpiexec-args", "Extra arguments for mpiexec."):argname("ARGS")
  start:option("--mem-limit", "Cap each engine's Lua memory at SIZE (bytes, or 256M, 2G)."):argname("SIZE")
  local stop = cluster:command("stop", "Stop a cluster: its controller and engines.")
  stop:option("--profile", "Profile name."):argname("P"):default("default")
  stop:flag("--all", "Stop every running cluster.")
  cluster:command("list", "List clusters: profile, pid, engines, address, uptime, refused.")
  cluster:command("clean", "Remove the files of clusters that are no longer running.")
  local engine = p:command("engine", "Start engines that join a running standalone cluster, behind one link.")
  engine:mutex(engine:option("--profile", "Profile name (default: default)."):argname("P"),
    engine:option("--file", "The cluster's connection file."):argname("CONNECTION_FILE"),
    engine:flag("--stdin", "Read the connection file from standard input (as launchers hand it over)."))
  engine:option("-n", "Number of engines on this host (default 1)."):argname("K")
  engine:mutex(engine:option("--id", "The first engine's id (default: the controller's next)."):argname("FIRST"),
    engine:flag("--rank", "The first engine's id is this process's MPI or Slurm rank."))
  engine:option("--host-name", "The host's name, as the cluster shows it."):argname("NAME")
  engine:option("--mem-limit", "Cap each engine's Lua memory at SIZE (bytes, or 256M, 2G)."):argname("SIZE")
  local kernel = p:command("kernel", "The Jupyter kernel (lpar kernel -f FILE), and its kernelspec.")
  kernel:command_target("action")
  kernel:require_command(false)
  kernel:option("-f", "Run the kernel on this Jupyter connection file."):argname("CONNECTION_FILE")
  for _, name in ipairs { "install", "uninstall" } do
    local c = kernel:command(name, name == "install" and "Install the kernelspec, for Jupyter to find."
      or "Remove the kernelspec.")
    c:mutex(c:flag("--user", "In the user's Jupyter data directory."),
      c:option("--prefix", "In DIR/share/jupyter/kernels."):argname("DIR"),
      c:flag("--sys-prefix", "In Python's sys.prefix (/usr/local here)."))
    c:option("--name", "The kernelspec's name."):argname("NAME"):default("lpar")
  end
  return p
end

local function usage_error(p, msg)
  io.stderr:write(p:get_usage(), "\n\nlpar: ", msg, "\n")
  return 2
end

--- Split argv into lpar's options and the script with its arguments.
local function split(argv)
  local i = 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then return table.move(argv, 1, i - 1, 1, {}), table.move(argv, i + 1, #argv, 1, {}) end
    if a == "-" or a:sub(1, 1) ~= "-" then break end
    -- -e CODE and -eCODE, --profile P and --profile=P
    i = i + ((VALUED[a] and 2) or 1)
  end
  return table.move(argv, 1, i - 1, 1, {}), table.move(argv, i, #argv, 1, {})
end

local function traceback(e)
  return debug.traceback(tostring(e), 2)
end

local function report(err)
  io.stderr:write("lpar: ", tostring(err), "\n")
  return 1
end

--- Run the main command: returns an exit status.
local function run_main(argv)
  local steps = {}
  local p = main_parser(steps)
  local mine, rest = split(argv)
  local ok, opts = p:pparse(mine)
  if not ok then return usage_error(p, opts) end
  local script = rest[1]
  -- arg: the script at 0, its arguments from 1, options below 0, as lua5.4 does.
  local arg = { [0] = script or "lpar" }
  for i, a in ipairs(mine) do arg[i - #mine - (script and 1 or 0)] = a end
  for i = 2, #rest do arg[i - 1] = rest[i] end
  _G.arg = arg
  if not script and #steps == 0 then -- the prompt, which starts its own engines
    require("lpar.prompt").main { n = opts.n or 0, profile = opts.profile }
    return 0
  end
  local lpar = require "lpar"
  local cluster, rc
  if opts.profile or opts.n then
    local cok, err = pcall(function()
      if opts.profile then
        rc = lpar.Client { profile = opts.profile }
      else
        cluster = lpar.Cluster { n = opts.n }
        rc = cluster:start_and_connect()
      end
    end)
    if not cok then return report(err) end
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
  end
  local function finish(status)
    if rc and not cluster then rc:close() end
    if cluster then cluster:stop() end
    return status
  end
  for _, step in ipairs(steps) do
    if step[1] == "l" then
      local lok, mod = xpcall(require, traceback, step[2])
      if not lok then return finish(report(mod)) end
      _G[step[2]:match("[^.]+$")] = mod
    else
      local chunk, err = load(step[2], "=(command line)", "t")
      if not chunk then return finish(report(err)) end
      local rok, rerr = xpcall(chunk, traceback)
      if not rok then return finish(report(rerr)) end
    end
  end
  if script then
    local chunk, err = loadfile(script ~= "-" and script or nil)
    if not chunk then return finish(report(err)) end
    local rok, rerr = xpcall(chunk, traceback, table.unpack(rest, 2))
    if not rok then return finish(report(rerr)) end
  end
  if opts.i then -- the prompt takes over the cluster or client started here
    require("lpar.prompt").main { rc = rc, cluster = cluster }
    return finish(0)
  end
  return finish(0)
end

--- Run `lpar cluster ...`, `lpar engine ...` or `lpar kernel ...`: returns an exit status.
local function run_command(argv)
  local p = command_parser()
  local ok, opts = p:pparse(argv)
  if not ok then return usage_error(p, opts) end
  return require("lpar.commands").run(opts, argv)
end

--- The lpar command: `argv` is its arguments (without the program name).
-- Returns the exit status.
function cli.main(argv)
  if argv[1] == "cluster" or argv[1] == "engine" or argv[1] == "kernel" then return run_command(argv) end
  return run_main(argv)
end

return cli
