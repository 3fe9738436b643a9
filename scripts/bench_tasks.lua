-- The benchmark rows of tasks at scale, for scripts/bench.lua (or alone:
-- `scripts/bench --tasks [--quick]`): tiny tasks through a load-balanced map
-- and DirectView apply_async, a 1,000,000-task map's rate and memory, imap
-- over an endless iterator, and two clients mapping on one standalone cluster.
-- `lpar scripts/bench_tasks.lua --client PROFILE N` (or `--window PROFILE
-- START SECONDS [US]`) is another client.
local lpar = require "lpar"
local uv = require "luv"

local identity = function(x) return x end

--- A process's memory from /proc/PID/status (default this one), in MB ("VmRSS", "VmHWM").
local function status_mb(field, pid)
  local f = io.open("/proc/" .. (pid or "self") .. "/status")
  local kb = f and tonumber(f:read("a"):match(field .. ":%s*(%d+)")) or 0
  if f then f:close() end
  return kb / 1024
end

--- Start the peak (VmHWM) afresh from the current RSS (Linux clear_refs 5).
local function reset_peak()
  local f = io.open("/proc/self/clear_refs", "w")
  if f then
    f:write("5")
    f:close()
  end
end

local function range(n)
  local t = {}
  for i = 1, n do t[i] = i end
  return t
end

--- Tasks per second of a load-balanced map of identity over n items.
local function map_rate(view, n)
  local list = range(n)
  local t0 = uv.hrtime()
  local out = view:map_sync(identity, list)
  local dt = (uv.hrtime() - t0) / 1e9
  assert(#out == n and out[n] == n, "the map lost results")
  return n / dt
end

--- Tasks per second of maps, one after another, from wall clock time
-- `start` (core.now() seconds) for `seconds`: two clients given the same
-- window are measured over the same time, whichever ends first. Each task
-- is identity, or busy `us` microseconds on its engine first.
local MAP_SIZE = 10000
local function window_rate(view, start, seconds, us)
  local list = range(MAP_SIZE)
  local core = require "lpar.core"
  local f = identity
  if us and us > 0 then
    f = function(x)
      local t = os.clock() + us * 1e-6
      while os.clock() < t do end
      return x
    end
  end
  while core.now() < start do uv.sleep(1) end
  local done = 0
  repeat
    local out = view:map_sync(f, list)
    assert(#out == MAP_SIZE and out[MAP_SIZE] == MAP_SIZE, "the map lost results")
    done = done + MAP_SIZE
  until core.now() >= start + seconds
  return done / (core.now() - start)
end

-- The second client: on the cluster of PROFILE, a map of N tasks, or maps
-- over a window; print the rate.
if arg and (arg[1] == "--client" or arg[1] == "--window") then
  local rc = lpar.Client { profile = arg[2] }
  local lb = rc:load_balanced_view()
  local rate = arg[1] == "--client" and map_rate(lb, tonumber(arg[3]))
    or window_rate(lb, tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]))
  print(string.format("rate %.1f", rate))
  rc:close()
  return
end

local function bench_tasks(b, rc)
  local row, count, pct, sorted = b.row, b.count, b.pct, b.sorted
  local lb = rc:load_balanced_view()

  -- Tiny tasks, load-balanced, on the 4 engines (2 cores here).
  local n = count(100000)
  local reps = {}
  -- Each rep starts without the last one's garbage to collect.
  for r = 1, 3 do
    collectgarbage()
    reps[r] = map_rate(lb, n)
  end
  local rate_100k = pct(sorted(reps), 0.5)
  row("lb_tiny", string.format("tiny tasks, load-balanced map of %d, 4 engines", n), rate_100k, "/s",
    ">= 100000 /s")

  -- DirectView apply_async, round robin over the engines, then one wait.
  local views = {}
  for i, id in ipairs(rc.ids) do views[i] = rc[id] end
  for r = 1, 3 do
    local ars = {}
    collectgarbage()
    local t0 = uv.hrtime()
    for i = 1, n do ars[i] = views[i % #views + 1]:apply_async(identity, i) end
    assert(rc:wait(ars, 300), "apply_async results did not all come")
    reps[r] = n / ((uv.hrtime() - t0) / 1e9)
  end
  row("direct_apply_async", string.format("DirectView apply_async of %d, 4 engines", n), pct(sorted(reps), 0.5),
    "/s", ">= 150000 /s")

  -- A long map: its rate beside the short one's, and the client's memory.
  local big = b.quick and 20000 or 1000000
  collectgarbage()
  collectgarbage()
  local before = status_mb("VmRSS")
  reset_peak()
  local rate_big = map_rate(lb, big)
  local peak = status_mb("VmHWM") - before
  collectgarbage()
  collectgarbage()
  row("lb_million", string.format("map of %d tiny tasks", big), rate_big, "/s")
  row("lb_million_ratio", "  rate of the short map / rate of it", rate_100k / rate_big, "x", "<= 1.2x")
  row("lb_million_peak", "  client peak RSS growth during it", peak, "MB", "<= 150 MB")
  row("lb_million_rss", "  client RSS growth after it is released", status_mb("VmRSS") - before, "MB",
    "<= 100 MB")

  -- imap over an endless iterator: the client's memory stays flat.
  local items = b.quick and 20000 or 1000000
  local i = 0
  local it, stats = lb:imap(identity, function()
    i = i + 1
    return i
  end)
  local mid
  collectgarbage()
  local rss0 = status_mb("VmRSS")
  local t0 = uv.hrtime()
  for k = 1, items do
    assert(it() ~= nil)
    if k == items // 2 then mid = status_mb("VmRSS") end
  end
  row("imap_rate", string.format("imap of %d over an endless iterator", items), items / ((uv.hrtime() - t0) / 1e9),
    "/s")
  row("imap_rss", "  client RSS growth, second half", status_mb("VmRSS") - mid, "MB", "flat (~0 MB)")
  row("imap_in_flight", "  most tasks in flight at once", stats.max_in_flight, "tasks")
  print(string.format("  (RSS growth over the first half: %.1f MB)", mid - rss0))
end

--- Two clients mapping at once on one standalone cluster of 4 engines.
local function bench_two_clients(b)
  local row, count = b.row, b.count
  local dir = os.tmpname()
  os.remove(dir)
  local old_dir = os.getenv("LPAR_DIR")
  uv.os_setenv("LPAR_DIR", dir)
  local lpar_cmd = uv.exepath()
  assert(os.execute(lpar_cmd .. " cluster start -n 4 --daemonize --profile tasks >/dev/null"))
  local ok, err = pcall(function()
    local n = count(100000)
    local rc = lpar.Client { profile = "tasks" }
    local f = assert(io.open(dir .. "/profile_tasks/connection.json"))
    local controller = math.tointeger(require("dkjson").decode(f:read("a")).pid)
    f:close()
    local lb = rc:load_balanced_view()
    map_rate(lb, 1000)
    local rss0 = status_mb("VmRSS", controller)
    local alone = map_rate(lb, n)
    row("two_clients_alone", "standalone: one client's map of identity", alone, "/s")
    -- Two client processes of their own (not this one, whose heap the other
    -- benchmarks grew), alone and then both at once over the same window,
    -- from a moment both have had time to connect by.
    local seconds = b.quick and 0.5 or 2
    local function clients(k, us)
      local start = require("lpar.core").now() + 1
      local procs, rates = {}, {}
      for i = 1, k do
        procs[i] = io.popen(string.format("%s scripts/bench_tasks.lua --window tasks %.3f %g %d", lpar_cmd, start,
          seconds, us))
      end
      for i = 1, k do
        rates[i] = tonumber((procs[i]:read("a") or ""):match("rate (%S+)"))
        procs[i]:close()
        assert(rates[i], "a client printed no rate")
      end
      return rates
    end
    -- Tasks with engine work: the engines are what the clients share, and
    -- the controller gives each half their time.
    local one = clients(1, 50)[1]
    row("two_clients_window", string.format("  one client mapping tasks of 50 us for %g s alone", seconds), one,
      "/s")
    local both = clients(2, 50)
    row("two_clients_mine", "  two at once, the same window: the first / half of alone", both[1] / (one / 2),
      "x", "0.8x - 1.2x")
    row("two_clients_theirs", "  two at once: the second / half of alone", both[2] / (one / 2), "x",
      "0.8x - 1.2x")
    row("two_clients_fair", "  two at once: the first's rate / the second's", both[1] / both[2], "x",
      "0.8x - 1.25x")
    -- Identity: bound by each client's own CPU, which the system shares out.
    one = clients(1, 0)[1]
    row("two_clients_identity", "  one client mapping identity alone (its own CPU is the bound)", one, "/s")
    both = clients(2, 0)
    row("two_clients_identity_fair", "  two at once, identity: the first's rate / the second's", both[1] / both[2],
      "x")
    print(string.format("  (identity, two at once: %.0f and %.0f /s)", both[1], both[2]))
    -- The controller over a million tasks from the two clients: its memory.
    local mid = status_mb("VmRSS", controller)
    local big = b.quick and 20000 or 500000
    local other = io.popen(string.format("%s scripts/bench_tasks.lua --client tasks %d", lpar_cmd, big))
    map_rate(lb, big)
    other:read("a")
    other:close()
    row("controller_rss_tasks", string.format("  controller RSS growth over %d more tasks from two clients", 2 * big),
      status_mb("VmRSS", controller) - mid, "MB", "flat")
    print(string.format("  (controller RSS: %.1f MB at the start, %.1f MB after the first maps)", rss0, mid))
    rc:shutdown()
    rc:close()
  end)
  if not ok then os.execute(lpar_cmd .. " cluster stop --profile tasks >/dev/null 2>&1") end
  os.execute("rm -rf '" .. dir .. "'")
  if old_dir then uv.os_setenv("LPAR_DIR", old_dir) else uv.os_unsetenv("LPAR_DIR") end
  if not ok then error(err, 0) end
end

local function bench_all(b, rc)
  bench_tasks(b, rc)
  bench_two_clients(b)
end

-- Run alone: the same rows, printed, on a cluster of its own.
if arg and arg[0] and arg[0]:match("bench_tasks%.lua$") then
  local quick = false
  for _, a in ipairs(arg) do if a == "--quick" then quick = true end end
  local b = dofile("scripts/bench_harness.lua")(quick)
  local rc <close> = lpar.Cluster { n = 4 }:start_and_connect()
  bench_all(b, rc)
end

return bench_all
