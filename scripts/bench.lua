-- Benchmarks of the foundation, as medians (and p99 for latencies) from one
-- run. Targets from DESIGN.md are printed beside each figure; they are not
-- asserted, since these machines are shared and noisy.
--   ./build/lpar scripts/bench.lua [--quick]
local lpar = require "lpar"
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

return rows
