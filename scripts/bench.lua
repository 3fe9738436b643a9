-- Benchmarks of the foundation, as medians (and p99 for latencies) from one
-- run. Targets from DESIGN.md are printed beside each figure; they are not
-- asserted, since these machines are shared and noisy.
--   ./build/lpar scripts/bench.lua [--quick]
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

local quick = arg[1] == "--quick"
local scale = quick and 0.05 or 1

local function count(n) return math.max(3, math.floor(n * scale)) end

local function sorted(t)
  table.sort(t)
  return t
end

local function pct(t, p) return t[math.max(1, math.ceil(#t * p))] end

local rows = {}
local function row(name, value, unit, target)
  rows[#rows + 1] = { name, value, unit, target or "" }
  print(string.format("%-44s %12.2f %-8s %s", name, value, unit, target or ""))
  io.stdout:flush()
end

print(string.format("lpar %s benchmarks, %s, %d CPUs%s", lpar.version, os.date("%Y-%m-%d %H:%M"),
  #uv.cpu_info(), quick and " (quick mode: figures are rough)" or ""))
print(string.format("%-44s %12s %-8s %s", "measure", "median", "unit", "target"))

-- Start 4 engines until all are ready.
do
  local times = {}
  for i = 1, count(20) do
    local t0 = uv.hrtime()
    local rc = lpar.Cluster { n = 4 }:start_and_connect()
    times[i] = (uv.hrtime() - t0) / 1e6
    rc:close()
  end
  row("start 4 engines, all ready", pct(sorted(times), 0.5), "ms", "<= 50 ms")
end

local rc <close> = lpar.Cluster { n = 4 }:start_and_connect()
local dview = rc:view()
local e0 = rc[0]
local identity = function(x) return x end

-- Idle engine resident memory, from /proc, before any work.
do
  local rss = {}
  for _, id in ipairs(rc.ids) do
    local pid = rc:queue_status()[id].pid
    local f = io.open("/proc/" .. pid .. "/status")
    local kb = f and tonumber(f:read("a"):match("VmRSS:%s*(%d+)")) or 0
    if f then f:close() end
    rss[#rss + 1] = kb / 1024
  end
  row("idle engine RSS", pct(sorted(rss), 0.5), "MB", "<= 4 MB")
end



local function round_trips(view, n)
  for _ = 1, 50 do view:apply_sync(identity, "") end -- warm up
  local t = {}
  for i = 1, n do
    local s = uv.hrtime()
    view:apply_sync(identity, "")
    t[i] = (uv.hrtime() - s) / 1e3
  end
  return sorted(t)
end

do
  local t = round_trips(e0, count(20000))
  row("apply(identity) round trip, 1 engine, p50", pct(t, 0.5), "us", "<= 50 us")
  row("apply(identity) round trip, 1 engine, p99", pct(t, 0.99), "us")
  t = round_trips(dview, count(5000))
  row("apply(identity) round trip, 4 engines, p50", pct(t, 0.5), "us")
  row("apply(identity) round trip, 4 engines, p99", pct(t, 0.99), "us")
end

-- execute(""): blocking, one at a time; non-blocking, many in flight.
do
  local n = count(20000)
  local reps = {}
  for r = 1, 3 do
    local t0 = uv.hrtime()
    for _ = 1, n do e0:execute("", { block = true }) end
    reps[r] = n / ((uv.hrtime() - t0) / 1e9)
  end
  row("execute(\"\") blocking, 1 engine", pct(sorted(reps), 0.5), "/s")
  for r = 1, 3 do
    local t0 = uv.hrtime()
    local ars = {}
    for i = 1, n do ars[i] = e0:execute("") end
    rc:wait(ars)
    reps[r] = n / ((uv.hrtime() - t0) / 1e9)
  end
  row("execute(\"\") non-blocking, 1 engine", pct(sorted(reps), 0.5), "/s")
end

-- Push a 2 MiB string to one engine.
do
  local s = string.rep("x", 2 * 1024 * 1024)
  local t = {}
  for i = 1, count(200) do
    local t0 = uv.hrtime()
    e0:push({ blob = s }, { block = true })
    t[i] = uv.hrtime() - t0
  end
  row("push 2 MiB string to 1 engine", #s / pct(sorted(t), 0.5), "GB/s", ">= 2 GB/s")
  e0:execute("blob = nil collectgarbage()", { block = true })
end

-- Load-balanced tiny tasks, on the 4 engines (2 cores here).
do
  local lb = rc:load_balanced_view()
  local n = count(200000)
  local list = {}
  for i = 1, n do list[i] = i end
  local reps = {}
  for r = 1, 3 do
    local t0 = uv.hrtime()
    lb:map_sync(identity, list)
    reps[r] = n / ((uv.hrtime() - t0) / 1e9)
  end
  row("tiny tasks, load-balanced map, 4 engines", pct(sorted(reps), 0.5), "/s", ">= 100000 /s")
  -- Balance: tasks of random 0-2 ms busy work against the ideal makespan.
  local m = quick and 100 or 1000
  local work, total = {}, 0
  for i = 1, m do
    work[i] = math.random() * 0.002
    total = total + work[i]
  end
  local busy = function(s) local t = os.clock() while os.clock() - t < s do end end
  local t0 = uv.hrtime()
  lb:map_sync(busy, work)
  local makespan = (uv.hrtime() - t0) / 1e9
  -- Ideal: the work spread evenly over the engines that can run at once.
  local parallel = math.min(#rc, #uv.cpu_info())
  row("random 0-2 ms tasks: makespan / ideal", makespan / (total / parallel), "x", "<= 1.1x")
end

local function rss_mb()
  local f = io.open("/proc/self/status")
  local kb = tonumber(f:read("a"):match("VmRSS:%s*(%d+)"))
  f:close()
  return kb / 1024
end

-- A long map with chunksize=1: the client's memory after it is freed.
do
  local lb = rc:load_balanced_view()
  local n = quick and 20000 or 1000000
  collectgarbage()
  local before, heap_before = rss_mb(), collectgarbage("count")
  local list = {}
  for i = 1, n do list[i] = i end
  local t0 = uv.hrtime()
  local out = lb:map_sync(identity, list, { chunksize = 1 })
  local dt = (uv.hrtime() - t0) / 1e9
  assert(#out == n)
  list, out = nil, nil -- luacheck: ignore
  collectgarbage()
  collectgarbage()
  row(string.format("map of %d tiny tasks, chunksize 1", n), n / dt, "/s")
  row("  client Lua heap growth after it", (collectgarbage("count") - heap_before) / 1024, "MB",
    "a few MB")
  row("  client RSS growth after it (malloc keeps freed memory)", rss_mb() - before, "MB")
end

-- Push matrices to one engine: 2 MiB and 64 MiB (shared memory, so the
-- time should not grow with the size).
do
  local t2, t64
  for _, case in ipairs { { 256 * 1024, "2 MiB" }, { 8 * 1024 * 1024, "64 MiB" } } do
    local a = matrix.random(case[1], 1, 1)
    local t = {}
    for i = 1, count(200) do
      local t0 = uv.hrtime()
      e0:push({ a = a }, { block = true })
      t[i] = uv.hrtime() - t0
    end
    local med = pct(sorted(t), 0.5)
    row("push " .. case[2] .. " matrix to 1 engine", case[1] * 8 / med, "GB/s",
      case[2] == "2 MiB" and ">= 5 GB/s" or nil)
    if case[2] == "2 MiB" then t2 = med else t64 = med end
  end
  row("push 64 MiB / push 2 MiB, time ratio", t64 / t2, "x", "<= 2x")
  e0:execute("a = nil collectgarbage()", { block = true })
end

-- Tiled dgemm over 2 engines (row blocks of A, B pushed once) against
-- OpenBLAS on 2 threads here; transfers included.
do
  local n = quick and 512 or 4096
  local rc2 <close> = lpar.Cluster { n = 2 }:start_and_connect()
  local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
  local function tiled()
    rc2:view():push({ B = B }, { block = true })
    local h = n // 2
    local times_b = function(a) return a:dot(B) end
    local top = rc2[0]:apply_async(times_b, A:sub(1, h, 1, n))
    local bottom = rc2[1]:apply_async(times_b, A:sub(h + 1, n, 1, n))
    return matrix.block { { top:get() }, { bottom:get() } }
  end
  local reps = quick and 3 or 5
  local tp, tl = {}, {}
  local before = matrix.blas_threads()
  local C, want
  for i = 1, reps do
    local t0 = uv.hrtime()
    C = tiled()
    tp[i] = (uv.hrtime() - t0) / 1e9
    matrix.blas_threads(2)
    t0 = uv.hrtime()
    want = A:dot(B)
    tl[i] = (uv.hrtime() - t0) / 1e9
    matrix.blas_threads(before)
  end
  assert(C:max_abs_diff(want) < 1e-9 * want:norm(), "tiled product is wrong")
  local gp, gl = 2 * n ^ 3 / pct(sorted(tp), 0.5) / 1e9, 2 * n ^ 3 / pct(sorted(tl), 0.5) / 1e9
  row(string.format("dgemm n=%d tiled on 2 engines", n), gp, "GFLOP/s")
  row(string.format("dgemm n=%d OpenBLAS, 2 threads", n), gl, "GFLOP/s")
  row("tiled / OpenBLAS", gp / gl, "x", ">= 0.9x")
end

return rows
