-- Benchmarks of the foundation, as medians (and p99 for latencies) from one
-- run. Targets from DESIGN.md are printed beside each figure; they are not
-- asserted, since these machines are shared and noisy.
--   ./build/lpar scripts/bench.lua [--quick] [--vs-ipyparallel] [--plots] [--json PATH]
-- --vs-ipyparallel runs scripts/bench_ipyparallel.py (Debian's python3) on
-- the same workloads and prints both with the ratio; --plots draws PNGs into
-- bench/ with gnuplot. Without --quick, bench/results.json gets every figure.
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"
local blas_bench = dofile("scripts/bench_blas.lua")

local quick, vs, plots, out_path = false, false, false, nil
for i, a in ipairs(arg) do
  if a == "--quick" then quick = true
  elseif a == "--vs-ipyparallel" then vs, plots = true, true
  elseif a == "--plots" then plots = true
  elseif a == "--json" then out_path = arg[i + 1]
  end
end
local harness = dofile("scripts/bench_harness.lua")(quick)
local count, sorted, pct, row, quartiles = harness.count, harness.sorted, harness.pct, harness.row,
  harness.quartiles
local rows, by_key, samples, round_trips = harness.rows, harness.by_key, harness.samples, harness.round_trips

print(string.format("lpar %s benchmarks, %s, %d CPUs%s", lpar.version, os.date("%Y-%m-%d %H:%M"),
  #uv.cpu_info(), quick and " (quick mode: figures are rough)" or ""))
print(string.format("%-52s %12s %-8s %s", "measure", "median", "unit", "target"))

-- Start N engines until all are ready.
for _, n in ipairs(quick and { 2, 4 } or { 2, 4, 64 }) do
  local times = {}
  for i = 1, count(n == 64 and 5 or 20) do
    local t0 = uv.hrtime()
    local c = lpar.Cluster { n = n }:start_and_connect()
    times[i] = (uv.hrtime() - t0) / 1e6
    c:close()
  end
  sorted(times)
  row("start_" .. n, string.format("start %d engines, all ready", n), pct(times, 0.5), "ms",
    n == 4 and "<= 50 ms" or nil, quartiles(times))
end

local rc <close> = lpar.Cluster { n = 4 }:start_and_connect()
local dview = rc:view()
local e0 = rc[0]

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
  row("rss", "idle engine RSS", pct(sorted(rss), 0.5), "MB", "<= 4 MB")
end



do
  local t = round_trips(e0, count(20000))
  samples.apply1 = t
  row("apply1_p50", "apply(identity) round trip, 1 engine, p50", pct(t, 0.5), "us", "<= 50 us")
  row("apply1_p99", "apply(identity) round trip, 1 engine, p99", pct(t, 0.99), "us")
  t = round_trips(dview, count(5000))
  row("apply4_p50", "apply(identity) round trip, 4 engines, p50", pct(t, 0.5), "us")
  row("apply4_p99", "apply(identity) round trip, 4 engines, p99", pct(t, 0.99), "us")
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
  row("exec_b", "execute(\"\") blocking, 1 engine", pct(sorted(reps), 0.5), "/s")
  for r = 1, 3 do
    local t0 = uv.hrtime()
    local ars = {}
    for i = 1, n do ars[i] = e0:execute("") end
    rc:wait(ars)
    reps[r] = n / ((uv.hrtime() - t0) / 1e9)
  end
  row("exec_nb", "execute(\"\") non-blocking, 1 engine", pct(sorted(reps), 0.5), "/s")
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
  row("push_string_2mib", "push 2 MiB string to 1 engine", #s / pct(sorted(t), 0.5), "GB/s", ">= 2 GB/s")
  e0:execute("blob = nil collectgarbage()", { block = true })
end

-- Tasks at scale (scripts/bench_tasks.lua): tiny tasks load-balanced and
-- direct, a 1,000,000-task map's rate and memory, imap, two clients.
dofile("scripts/bench_tasks.lua")(harness, rc)

do
  local lb = rc:load_balanced_view()
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
  row("lb_balance", "random 0-2 ms tasks: makespan / ideal", makespan / (total / parallel), "x", "<= 1.1x")
end

--- Resident memory of process `pid` (default this one), in MB.
local function rss_mb(pid)
  local f = io.open("/proc/" .. (pid or "self") .. "/status")
  local kb = f and tonumber(f:read("a"):match("VmRSS:%s*(%d+)")) or 0
  if f then f:close() end
  return kb / 1024
end

-- Push matrices to one engine: 2 MiB and 64 MiB (shared memory, so the
-- time should not grow with the size).
do
  local t2, t64
  for _, case in ipairs { { 256 * 1024, "2 MiB", "2mib" }, { 8 * 1024 * 1024, "64 MiB", "64mib" } } do
    local a = matrix.random(case[1], 1, 1)
    local t = {}
    for i = 1, count(200) do
      local t0 = uv.hrtime()
      e0:push({ a = a }, { block = true })
      t[i] = uv.hrtime() - t0
    end
    local med = pct(sorted(t), 0.5)
    row("push_matrix_" .. case[3], "push " .. case[2] .. " matrix to 1 engine", case[1] * 8 / med, "GB/s",
      case[2] == "2 MiB" and ">= 5 GB/s" or nil)
    if case[2] == "2 MiB" then t2 = med else t64 = med end
  end
  row("push_ratio", "push 64 MiB / push 2 MiB, time ratio", t64 / t2, "x", "<= 2x")
  e0:execute("a = nil collectgarbage()", { block = true })
end

-- OpenBLAS: A:dot(B) on 1 and 2 threads, and the tiled product on 2
-- engines against OpenBLAS on 2 threads, with the same kernel.
local blas_info = blas_bench.run(row, quick)

-- execute("") round trips, on one engine and on all.
for _, case in ipairs { { "exec1", e0, "1 engine" }, { "exec4", dview, "4 engines" } } do
  local t = {}
  for i = 1, count(5000) do
    local t0 = uv.hrtime()
    case[2]:execute("", { block = true })
    t[i] = (uv.hrtime() - t0) / 1e3
  end
  sorted(t)
  row(case[1] .. "_p50", "execute(\"\") round trip, " .. case[3] .. ", p50", pct(t, 0.5), "us")
  row(case[1] .. "_p99", "execute(\"\") round trip, " .. case[3] .. ", p99", pct(t, 0.99), "us")
end

-- The notebook's bandwidth table: push and pull 1K..256K doubles.
do
  local size = 1024
  while size <= 256 * 1024 do
    local a = matrix.random(size, 1, 1)
    for _, dir in ipairs { "push", "pull" } do
      local t = {}
      for i = 1, count(100) do
        local t0 = uv.hrtime()
        if dir == "push" then e0:push({ a = a }, { block = true }) else e0:pull("a"):get() end
        t[i] = (uv.hrtime() - t0) / 1e9
      end
      sorted(t)
      row(dir .. "_" .. size, string.format("%s %d doubles", dir, size), size * 8 / pct(t, 0.5) / 1e9, "GB/s")
    end
    size = size * 2
  end
  local big = matrix.random(8 * 1024 * 1024, 1, 2)
  e0:push({ big = big }, { block = true })
  local t = {}
  for i = 1, count(20) do
    local t0 = uv.hrtime()
    e0:pull("big"):get()
    t[i] = (uv.hrtime() - t0) / 1e9
  end
  row("pull_64mib", "pull 64 MiB matrix from 1 engine", 64 * 2 ^ 20 / pct(sorted(t), 0.5) / 1e9, "GB/s")
  e0:execute("big = nil a = nil collectgarbage()", { block = true })
end

-- Encoding throughput, in one process.
do
  local t = {}
  for i = 1, 1e6 do t[i] = i * 0.5 end
  local m = matrix.random(1024, 1024, 3)
  for _, case in ipairs {
    { "encode_table", "encode a table of 1e6 numbers", t },
    { "encode_matrix", "encode an 8 MiB matrix", m },
  } do
    local bytes = #assert(lpar.encode(case[3]))
    local r = lpar.timeit(function() lpar.encode(case[3]) end, { number = quick and 2 or 10, quiet = true })
    row(case[1], case[2], bytes / r.best / 1e9, "GB/s")
  end
end

-- Tiled dgemm on the 4 engines for growing n (for the plot), and the
-- notebook's n=1024 quadrants.
do
  local n_list = quick and { 256, 512 } or { 512, 1024, 2048, 4096 }
  local times_b = function(a) return a:dot(B) end -- luacheck: ignore
  for _, n in ipairs(n_list) do
    local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
    local rows4 = (n + 3) // 4
    local t0 = uv.hrtime()
    dview:push({ B = B }, { block = true })
    local parts = {}
    for k = 0, 3 do
      parts[k + 1] = rc[k]:apply_async(times_b, A:sub(k * rows4 + 1, math.min(n, (k + 1) * rows4), 1, n))
    end
    local tiles = {}
    for k, ar in ipairs(parts) do tiles[k] = { ar:get() } end
    local C = matrix.block(tiles)
    local dt = (uv.hrtime() - t0) / 1e9
    assert(C:max_abs_diff(A:dot(B)) < 1e-9 * n, "tiled product is wrong")
    row("dgemm_tiled_" .. n, string.format("dgemm n=%d tiled on 4 engines", n), 2 * n ^ 3 / dt / 1e9, "GFLOP/s")
  end
end

-- How fast links seal (core/test/bench_auth.c): AEAD against the HMAC the
-- links used before, for one 2 MiB payload.
do
  local exe = uv.exepath():match("^(.*)/[^/]*$") .. "/core/test/bench_auth"
  local p = io.popen("'" .. exe .. "' 2>/dev/null")
  local names = {
    seal_2mib_aes256gcm = "seal 2 MiB with AES-256-GCM (links)",
    seal_2mib_fallback = "seal 2 MiB with XChaCha20 (no AES here)",
    seal_2mib_xchacha20poly1305 = "seal 2 MiB with XChaCha20-Poly1305",
    hmac_2mib_sha256 = "HMAC-SHA256 of 2 MiB (the links before)",
  }
  local got = 0
  for line in p:lines() do
    local key, value, unit = line:match("^(%S+)\t(%S+)\t(%S+)$")
    if key then
      row(key, names[key] or key, tonumber(value), unit)
      got = got + 1
    end
  end
  p:close()
  if got == 0 then print("(no figures from " .. exe .. ": build it with scripts/build)") end
end

-- A standalone cluster (lpar cluster start) in a scratch LPAR_DIR: the
-- time until `start --daemonize` returns with engines ready; round trips and
-- pushes through the controller's relay, over its unix socket (matrices as
-- memfds) and over TCP (inline, encrypted); the idle controller's CPU time.
local function proc_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return nil end
  local fields = {}
  for x in f:read("a"):match("%) (.*)"):gmatch("%S+") do fields[#fields + 1] = x end
  f:close()
  return fields
end

do
  local dir = os.tmpname()
  os.remove(dir)
  uv.os_setenv("LPAR_DIR", dir)
  local lpar_cmd = uv.exepath()
  local function run(cmd)
    assert(os.execute(lpar_cmd .. " cluster " .. cmd .. " >/dev/null"), "lpar cluster " .. cmd .. " failed")
  end
  local times = {}
  for i = 1, count(10) do
    local t0 = uv.hrtime()
    run("start -n 4 --daemonize --profile bench")
    times[i] = (uv.hrtime() - t0) / 1e6
    run("stop --profile bench")
  end
  sorted(times)
  row("standalone_start_4", "standalone: cluster start -n 4 --daemonize", pct(times, 0.5), "ms", "<= 200 ms",
    quartiles(times))
  run("start -n 2 --daemonize --profile bench --port 0")
  local dkjson = require "dkjson"
  local conn = dir .. "/profile_bench/connection.json"
  local info = dkjson.decode(assert(io.open(conn)):read("a"))
  local controller = math.tointeger(info.pid)
  -- The same cluster over TCP only: its connection file without the socket.
  local tcp_conn = dir .. "/tcp-connection.json"
  local f = assert(io.open(tcp_conn, "w"))
  info.socket = nil
  f:write(dkjson.encode(info))
  f:close()
  os.execute("chmod 600 '" .. tcp_conn .. "'")

  -- Idle: CPU ticks (user + system) of the controller over 2 s with a client connected.
  local sc = lpar.Client { profile = "bench" }
  local before = proc_stat(controller)
  uv.sleep(2000)
  local after = proc_stat(controller)
  row("standalone_idle_ticks", "standalone: idle controller CPU over 2 s",
    (after[12] + after[13]) - (before[12] + before[13]), "ticks", "0 ticks")

  local embedded = pct(samples.apply1, 0.5)
  local function transport(prefix, label, client, target_rt, target_push)
    local t = round_trips(client[0], count(20000))
    row(prefix .. "_apply1_p50", label .. ": apply(identity) round trip, p50", pct(t, 0.5), "us", target_rt)
    row(prefix .. "_apply1_p99", label .. ": apply(identity) round trip, p99", pct(t, 0.99), "us")
    row(prefix .. "_apply1_ratio", label .. ": round trip / embedded, p50", pct(t, 0.5) / embedded, "x",
      prefix == "standalone" and "<= 1.3x" or nil)
    local push_times = {}
    for _, case in ipairs { { 256 * 1024, "2mib", 50 }, { 8 * 1024 * 1024, "64mib", 5 } } do
      local a = matrix.random(case[1], 1, 1)
      local pt = {}
      for i = 1, count(case[3]) do
        local t0 = uv.hrtime()
        client[0]:push({ a = a }, { block = true })
        pt[i] = uv.hrtime() - t0
      end
      push_times[case[2]] = pct(sorted(pt), 0.5)
      row(prefix .. "_push_" .. case[2], label .. ": push " .. case[2]:upper():gsub("MIB", " MiB") .. " matrix",
        case[1] * 8 / push_times[case[2]], "GB/s", case[2] == "2mib" and target_push or nil)
    end
    row(prefix .. "_push_ratio", label .. ": push 64 MiB / 2 MiB, time",
      push_times["64mib"] / push_times["2mib"], "x", prefix == "standalone" and "<= 2x" or nil)
  end
  transport("standalone", "standalone", sc, "<= 1.3x embedded", ">= 5 GB/s")
  row("standalone_controller_rss", "standalone: controller RSS after 64 MiB pushes", rss_mb(controller), "MB",
    "< 20 MB")
  local tc = lpar.Client { connection_file = tcp_conn }
  print("standalone TCP links are sealed with " .. tc._hub.core:stats().cipher)
  transport("tcp", "standalone TCP", tc, "<= 100 us", ">= 1.5 GB/s")
  tc:close()
  sc:shutdown()
  sc:close()
  os.execute("rm -rf '" .. dir .. "'")
  uv.os_unsetenv("LPAR_DIR")
end

-- Engines on other hosts (scripts/bench_hosts.lua: namespace hosts over ssh).
dofile("scripts/bench_hosts.lua")(harness)

-- lpar.mpi between MPI engines (scripts/bench_mpi.lua: SUMMA, allreduce).
dofile("scripts/bench_mpi.lua")(harness)

-- results.json: machine, versions, date, every figure; written with
-- lua-dkjson, so strings are escaped as JSON wants and NaN or inf become null.
local function json(v)
  return require("dkjson").encode(v, { indent = true })
end

local function command_output(cmd)
  local p = io.popen(cmd .. " 2>/dev/null")
  local out = p and p:read("a") or ""
  if p then p:close() end
  return (out:gsub("%s+$", ""))
end

local function write_results(path, extra)
  local figures = {}
  for _, r in ipairs(rows) do
    figures[#figures + 1] = { key = r.key, name = r.name, value = r.value, unit = r.unit,
                              target = r.target, spread = r.spread }
  end
  local doc = {
    date = os.date("!%Y-%m-%dT%H:%M:%SZ"), quick = quick,
    machine = { cpus = #uv.cpu_info(), cpu = uv.cpu_info()[1].model, memory_mb = uv.get_total_memory() // 2 ^ 20,
                kernel = command_output("uname -r") },
    versions = { lpar = lpar.version, lua = _VERSION, libuv = uv.version_string(),
                 ipyparallel = extra and extra.version or nil },
    lpar = figures, ipyparallel = extra and extra.figures or nil, blas = blas_info,
  }
  os.execute("mkdir -p '" .. (path:match("^(.*)/") or ".") .. "'")
  local f = assert(io.open(path, "w"))
  f:write(json(doc), "\n")
  f:close()
  print("wrote " .. path)
end

-- ipyparallel, the same workloads, side by side.
local ipp
if vs then
  print()
  print("ipyparallel, same workloads (4 engines on " .. #uv.cpu_info() .. " cores)...")
  local cmd = "/usr/bin/python3 scripts/bench_ipyparallel.py" .. (quick and " --quick" or "")
  local p = assert(io.popen(cmd))
  ipp = { figures = {}, by_key = {}, samples = {} }
  for line in p:lines() do
    local a, b, c = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)$")
    if a == "sample" then
      ipp.samples[b] = ipp.samples[b] or {}
      table.insert(ipp.samples[b], tonumber(c))
    elseif a then
      local r = { key = a, value = tonumber(b), unit = c }
      ipp.figures[#ipp.figures + 1] = r
      ipp.by_key[a] = r
    end
  end
  p:close()
  ipp.version = command_output("/usr/bin/python3 -c 'import ipyparallel; print(ipyparallel.__version__)'")
  print()
  print(string.format("%-52s %12s %12s %10s", "measure (times: lower is better)", "lpar", "ipyparallel",
    "lpar/ipp"))
  for _, r in ipairs(rows) do
    local o = ipp.by_key[r.key]
    if o then
      print(string.format("%-52s %12.4g %12.4g %10.3g  %s", r.name, r.value, o.value, r.value / o.value, r.unit))
    end
  end
end

if not quick or out_path then write_results(out_path or "bench/results.json", ipp) end

-- Plots, with gnuplot when it is there.
if plots and os.execute("command -v gnuplot >/dev/null") then
  local dir = "bench"
  os.execute("mkdir -p " .. dir)
  local function data(name, lines)
    local f = assert(io.open(dir .. "/" .. name, "w"))
    f:write(table.concat(lines, "\n"), "\n")
    f:close()
  end
  local bw = {}
  local size = 1024
  while size <= 256 * 1024 do
    local o = ipp and ipp.by_key["push_" .. size]
    bw[#bw + 1] = string.format("%d %g %s", size * 8, by_key["push_" .. size].value, o and o.value or "NaN")
    size = size * 2
  end
  data("bandwidth.dat", bw)
  local lat = {}
  for _, v in ipairs(samples.apply1) do lat[#lat + 1] = string.format("lpar %g", v) end
  for _, v in ipairs(ipp and ipp.samples.apply1 or {}) do lat[#lat + 1] = string.format("ipp %g", v) end
  data("latency.dat", lat)
  local dg = {}
  for _, r in ipairs(rows) do
    local n = r.key:match("^dgemm_tiled_(%d+)$")
    if n then
      local o = ipp and ipp.by_key[r.key]
      dg[#dg + 1] = string.format("%s %g %s", n, r.value, o and o.value or "NaN")
    end
  end
  data("dgemm.dat", dg)
  local script = [[
set terminal pngcairo size 800,500
set output "bench/bandwidth.png"
set logscale xy
set xlabel "message size (bytes)"
set ylabel "push bandwidth (GB/s)"
set title "Push to one engine"
plot "bench/bandwidth.dat" using 1:2 with linespoints title "lpar", "" using 1:3 with linespoints title "ipyparallel"
set output "bench/latency.png"
unset logscale
set logscale x
set xlabel "apply(identity) round trip (us)"
set ylabel "count"
set title "Round-trip latency, one engine"
set style fill solid 0.5
bin(x) = 10 ** (floor(log10(x) * 20) / 20.0)
plot "< grep ^lpar bench/latency.dat" using (bin($2)):(1) smooth frequency with boxes title "lpar", \
     "< grep ^ipp bench/latency.dat" using (bin($2)):(1) smooth frequency with boxes title "ipyparallel"
set output "bench/dgemm.png"
unset logscale
set logscale x 2
set xlabel "n"
set ylabel "GFLOP/s"
set title "Tiled dgemm on 4 engines, transfers included"
plot "bench/dgemm.dat" using 1:2 with linespoints title "lpar", "" using 1:3 with linespoints title "ipyparallel"
]]
  data("plots.gp", { script })
  if os.execute("gnuplot bench/plots.gp") then
    print("wrote bench/bandwidth.png, bench/latency.png, bench/dgemm.png")
  end
end

return rows
