--- The chaos soak (issue 18): load-balanced maps with retries while engines
-- are SIGKILLed, SIGSEGVed and SIGSTOPped/SIGCONTed at random and
-- restart_engines brings them back; then the same on a standalone cluster
-- while its clients are SIGKILLed too and reconnect.
-- It checks that every task's result arrives once and is right, that no
-- wait goes past its bound, and that memory stays flat; it prints figures
-- and exits non-zero on any failure.
--   ./build/lpar scripts/soak.lua [--seconds S | --minutes M] [--seed N]
local lpar = require "lpar"
local uv = require "luv"

local opts = { seconds = 30, seed = os.time() }
do
  local i = 1
  while i <= #arg do
    local a = arg[i]
    if a == "--seconds" then opts.seconds = tonumber(arg[i + 1]); i = i + 1
    elseif a == "--minutes" then opts.seconds = 60 * tonumber(arg[i + 1]); i = i + 1
    elseif a == "--seed" then opts.seed = tonumber(arg[i + 1]); i = i + 1
    else io.stderr:write("usage: soak [--seconds S | --minutes M] [--seed N]\n"); os.exit(2) end
    i = i + 1
  end
end
math.randomseed(opts.seed)

local N_ENGINES = 4
local MAP_BOUND = 60 -- seconds a map may take, chaos and all, before it counts as a hang
local failures = {}
local function fail(fmt, ...)
  local msg = string.format(fmt, ...)
  failures[#failures + 1] = msg
  io.stderr:write("soak: FAIL: ", msg, "\n")
end

local function now() return uv.hrtime() / 1e9 end

local function rss_mb(pid)
  local f = io.open("/proc/" .. (pid or "self") .. "/status")
  if not f then return 0 end
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)")) or 0
  f:close()
  return kb / 1024
end

local function median(list)
  if #list == 0 then return 0 end
  local s = table.move(list, 1, #list, 1, {})
  table.sort(s)
  return s[(#s + 1) // 2]
end

local function p99(list)
  if #list == 0 then return 0 end
  local s = table.move(list, 1, #list, 1, {})
  table.sort(s)
  return s[math.max(1, math.ceil(#s * 0.99))]
end

local function max_of(list)
  local m = 0
  for _, v in ipairs(list) do m = math.max(m, v) end
  return m
end

-- The task: cheap, deterministic, and checkable.
local function task(x)
  local t = os.clock()
  if x % 97 == 0 then while os.clock() - t < 0.002 do end end
  return x * x + 1
end

local function check_map(out, first, n, label)
  if type(out) ~= "table" then
    fail("%s: map returned %s", label, tostring(out))
    return 0
  end
  local bad = 0
  for i = 1, n do
    local x = first + i - 1
    if out[i] ~= x * x + 1 then
      bad = bad + 1
      if bad <= 3 then fail("%s: element %d is %s, not %d", label, i, tostring(out[i]), x * x + 1) end
    end
  end
  if out[n + 1] ~= nil then fail("%s: more results than tasks", label) end
  return n - bad
end

--- One chaos action on the engines `pids()` lists; returns a description.
-- `stopped` (pid -> time to continue) and `killed` (id -> kill time) are
-- kept by the caller.
local function chaos(pids, stopped, killed, stats)
  local ids = {}
  for id, pid in pairs(pids()) do
    if not stopped[pid] and not killed[id] then ids[#ids + 1] = { id, pid } end
  end
  if #ids == 0 then return end
  local pick = ids[math.random(#ids)]
  local r = math.random()
  if r < 0.4 then
    killed[pick[1]] = now()
    uv.kill(pick[2], "sigkill")
    stats.kills = stats.kills + 1
  elseif r < 0.6 then
    killed[pick[1]] = now()
    uv.kill(pick[2], "sigsegv")
    stats.segvs = stats.segvs + 1
  else
    stopped[pick[2]] = now() + 0.05 + math.random() * 0.4
    uv.kill(pick[2], "sigstop")
    stats.stops = stats.stops + 1
  end
end

local function continue_due(stopped, all)
  for pid, t in pairs(stopped) do
    if all or now() >= t then
      uv.kill(pid, "sigcont")
      stopped[pid] = nil
    end
  end
end

--- Maps until `deadline`, chaos between short waits. `rc` is the client;
-- `restart(ids)` brings dead engines back; returns the stats.
local function run_maps(rc, restart, deadline, label)
  local stats = { maps = 0, tasks = 0, ok = 0, kills = 0, segvs = 0, stops = 0, restarts = 0,
                  death_ms = {}, map_s = {} }
  local stopped, killed = {}, {}
  local hub = rc._hub
  -- How long each death took to be reported.
  hub.on_ready[#hub.on_ready + 1] = function(id)
    if killed[id] and hub:engine_state(id) == "dead" then
      stats.death_ms[#stats.death_ms + 1] = (now() - killed[id]) * 1000
      killed[id] = false
    end
  end
  local function pids()
    local out = {}
    for _, id in ipairs(hub:ids_shared()) do
      local e = hub.engines[id]
      if e and e.pid then out[id] = e.pid end
    end
    return out
  end
  local lb = rc:load_balanced_view()
  lb.retries = 20
  local next_chaos, x0 = now() + 0.1, 1
  while now() < deadline do
    local n = math.random(200, 3000)
    local list = {}
    for i = 1, n do list[i] = x0 + i - 1 end
    local t0 = now()
    local ar = lb:map_async(task, list, { chunksize = math.random(1, 4) })
    while not ar:ready() and now() - t0 < MAP_BOUND do
      ar:wait(0.02)
      continue_due(stopped)
      if now() >= next_chaos then
        chaos(pids, stopped, killed, stats)
        next_chaos = now() + 0.1 + math.random() * 0.4
      end
      -- Bring back what died, once its death is seen.
      local dead = {}
      for id, t in pairs(killed) do
        if t == false or (t and hub:engine_state(id) == "dead") then dead[#dead + 1] = id end
      end
      if #dead > 0 and math.random() < 0.3 then
        table.sort(dead)
        local ok, err = pcall(restart, dead)
        if ok then
          for _, id in ipairs(dead) do killed[id] = nil end
          stats.restarts = stats.restarts + 1
        else
          io.stderr:write("soak: restart: ", tostring(err), "\n")
        end
      end
    end
    stats.maps, stats.tasks = stats.maps + 1, stats.tasks + n
    if not ar:ready() then
      fail("%s: a map of %d tasks was not done after %d s (%d/%d chunks)", label, n, MAP_BOUND,
        ar.progress, #ar)
    else
      local ok, out = pcall(ar.get, ar, 1)
      if not ok then fail("%s: a map failed: %s", label, tostring(out)) else
        stats.ok = stats.ok + check_map(out, x0, n, label)
      end
      stats.map_s[#stats.map_s + 1] = now() - t0
    end
    x0 = x0 + n
  end
  continue_due(stopped, true)
  -- Leave every engine up for the next phase.
  local dead = {}
  for _, id in ipairs(hub:all_ids()) do
    if hub:engine_state(id) ~= "ready" then dead[#dead + 1] = id end
  end
  if #dead > 0 then pcall(restart, dead) end
  return stats
end

local function report(label, stats, rss0, rss1, extra)
  print(string.format("%s: %d maps, %d tasks, %d right, %d lost or wrong; %d SIGKILL, %d SIGSEGV, "
    .. "%d SIGSTOP, %d restarts; deaths reported in median %.1f ms, p99 %.1f ms, max %.1f ms (%d); map median %.2f s, "
    .. "max %.2f s; client RSS %.1f -> %.1f MB%s",
    label, stats.maps, stats.tasks, stats.ok, stats.tasks - stats.ok, stats.kills, stats.segvs,
    stats.stops, stats.restarts, median(stats.death_ms), p99(stats.death_ms), max_of(stats.death_ms),
    #stats.death_ms,
    median(stats.map_s), max_of(stats.map_s), rss0, rss1, extra or ""))
  if stats.tasks ~= stats.ok then fail("%s: %d tasks lost or wrong", label, stats.tasks - stats.ok) end
end

-- Phase 1: an embedded cluster.
local t_start = now()
local half = opts.seconds / 2
do
  local cluster = lpar.Cluster { n = N_ENGINES }
  local rc = cluster:start_and_connect()
  collectgarbage()
  local rss0 = rss_mb()
  local stats = run_maps(rc, function(ids) cluster:restart_engines(ids) end, now() + half, "embedded")
  collectgarbage()
  collectgarbage()
  report("embedded", stats, rss0, rss_mb())
  if rss_mb() - rss0 > 100 then fail("embedded: client RSS grew by %.1f MB", rss_mb() - rss0) end
  -- A big map, released: the client's memory must come back.
  local big = opts.seconds >= 600 and 1000000 or 100000
  local before = rss_mb()
  local peak = (function()
    local list = {}
    for i = 1, big do list[i] = i end
    local t0 = now()
    local ar = rc:load_balanced_view():map_async(function(x) return x + 1 end, list)
    local ok, out = pcall(ar.get, ar, 10 * MAP_BOUND)
    if not ok then fail("embedded: the %d-task map failed: %s", big, tostring(out))
    else
      local bad = 0
      for i = 1, big do if out[i] ~= i + 1 then bad = bad + 1 end end
      if bad > 0 then fail("embedded: %d of the %d-task map wrong", bad, big) end
    end
    print(string.format("embedded: a %d-task map in %.1f s", big, now() - t0))
    return rss_mb()
  end)()
  collectgarbage()
  collectgarbage()
  local after = rss_mb()
  print(string.format("embedded: client RSS %.1f MB before a %d-task map, %.1f MB with its result, "
    .. "%.1f MB once released", before, big, peak, after))
  if after - before > 100 then fail("embedded: %.1f MB stayed after the map was released", after - before) end
  rc:close()
  cluster:stop()
end

-- Phase 2: a standalone cluster; clients come and go (some SIGKILLed).
do
  local dir = os.tmpname()
  os.remove(dir)
  uv.os_setenv("LPAR_DIR", dir)
  local lpar_cmd = arg[-1] and arg[-1]:match("lpar$") and arg[-1] or "./build/lpar"
  local function sh(cmd)
    local p = io.popen("LPAR_DIR='" .. dir .. "' " .. cmd .. " 2>&1")
    local out = p:read("a")
    local ok = p:close()
    return out, ok
  end
  local out, ok = sh(lpar_cmd .. " cluster start --daemonize --profile soak -n " .. N_ENGINES)
  if not ok then
    fail("standalone: the cluster did not start: %s", out)
  else
    -- Whatever happens in here, the cluster is stopped after it: a soak leaves nothing running.
    local body_ok, body_err = pcall(function()
      local conn = require("dkjson").decode(io.open(dir .. "/profile_soak/connection.json"):read("a"))
      local controller = math.tointeger(conn.pid)
      local rc = lpar.Client { profile = "soak" }
      -- A client that runs maps and checks them, until it is killed.
      local client_src = os.tmpname()
      local f = io.open(client_src, "w")
      f:write([[
        local lpar = require "lpar"
        local rc = lpar.Client { profile = "soak" }
        local lb = rc:load_balanced_view()
        lb.retries = 20
        local x0 = 1
        while true do
          local n = math.random(100, 1000)
          local list = {}
          for i = 1, n do list[i] = x0 + i - 1 end
          local ok, out = pcall(function() return lb:map(function(x) return x * x + 1 end, list):get(60) end)
          local bad = ok and 0 or n
          if ok then
            for i = 1, n do if out[i] ~= list[i] * list[i] + 1 then bad = bad + 1 end end
          end
          io.write(string.format("map %d %d %s\n", n, bad, ok and "" or tostring(out):gsub("\n", " ")))
          io.stdout:flush()
          x0 = x0 + n
        end
      ]])
      f:close()
      local clients, client_stats = {}, { started = 0, killed = 0, maps = 0, tasks = 0, bad = 0 }
      local function start_client()
        local stdout = uv.new_pipe()
        local handle, pid
        handle, pid = uv.spawn(lpar_cmd, { args = { client_src }, stdio = { nil, stdout, 2 } },
          function() end)
        if not handle then return end
        local c = { handle = handle, pid = pid, pipe = stdout, buf = "" }
        stdout:read_start(function(_, data)
          if not data then return end
          c.buf = c.buf .. data
          for line in c.buf:gmatch("([^\n]*)\n") do
            local n, bad, why = line:match("^map (%d+) (%d+) ?(.*)$")
            if n then
              client_stats.maps, client_stats.tasks = client_stats.maps + 1, client_stats.tasks + tonumber(n)
              client_stats.bad = client_stats.bad + tonumber(bad)
              if tonumber(bad) > 0 then fail("standalone client %d: %s of %s wrong: %s", pid, bad, n, why) end
            end
          end
          c.buf = c.buf:match("[^\n]*$")
        end)
        clients[#clients + 1] = c
        client_stats.started = client_stats.started + 1
      end
      start_client()
      start_client()
      local crss0 = rss_mb(controller)
      collectgarbage()
      local rss0 = rss_mb()
      local deadline = now() + math.max(5, opts.seconds - (now() - t_start))
      -- Kill a client now and then (from a timer: run_maps runs the loop).
      local killer = uv.new_timer()
      killer:start(700, 700, function()
        if #clients > 0 and math.random() < 0.5 then
          local c = table.remove(clients, math.random(#clients))
          uv.kill(c.pid, "sigkill")
          client_stats.killed = client_stats.killed + 1
        end
        while #clients < 2 do start_client() end
      end)
      local stats = run_maps(rc, function(ids) rc._hub:restart(ids, N_ENGINES, 10, 1) end, deadline,
        "standalone")
      killer:stop()
      for _, c in ipairs(clients) do uv.kill(c.pid, "sigkill") end
      collectgarbage()
      collectgarbage()
      report("standalone", stats, rss0, rss_mb(), string.format("; controller RSS %.1f -> %.1f MB; "
        .. "%d clients started, %d SIGKILLed, their %d maps of %d tasks, %d wrong",
        crss0, rss_mb(controller), client_stats.started, client_stats.killed, client_stats.maps,
        client_stats.tasks, client_stats.bad))
      if rss_mb(controller) - crss0 > 50 then
        fail("standalone: controller RSS grew by %.1f MB", rss_mb(controller) - crss0)
      end
      if client_stats.maps == 0 then fail("standalone: no client finished a map") end
      rc:close()
      killer:close()
      sh(lpar_cmd .. " cluster stop --profile soak")
      os.remove(client_src)
    end)
    if not body_ok then
      fail("standalone: %s", tostring(body_err))
      sh(lpar_cmd .. " cluster stop --profile soak")
    end
  end
  os.execute("rm -rf '" .. dir .. "'")
end

print(string.format("soak: %d failures in %.0f s (seed %d)", #failures, now() - t_start, opts.seed))
os.exit(#failures == 0 and 0 or 1)
