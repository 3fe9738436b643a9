-- The benchmark rows of lpar.mpi, for scripts/bench.lua (or alone:
-- `scripts/bench --mpi [--quick]`): SUMMA (examples/summa.lua) on 2 MPI
-- engines against OpenBLAS on 2 threads here, the bytes SUMMA moves through
-- the client on 4 engines, allreduce of 1 MiB beside a memcpy of 1 MiB, and
-- the latency of an allreduce of one number. The engines run one OpenBLAS
-- thread each (their default), so 2 engines use the 2 threads OpenBLAS gets.
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local uv = require "luv"

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

local function bench_mpi(b)
  local row, quick = b.row, b.quick
  local dir = os.tmpname()
  os.remove(dir)
  uv.os_setenv("LPAR_DIR", dir)
  if uv.getuid() == 0 then -- OpenMPI refuses root unless told twice
    uv.os_setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    uv.os_setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
  end
  local lpar_cmd = uv.exepath()
  local function summa(profile, n)
    local p = io.popen(string.format("%s examples/summa.lua --profile %s -n %d 2>&1", lpar_cmd, profile, n))
    local out = p:read("a")
    p:close()
    local t = tonumber(out:match("SUMMA n=%d+ on %d+ engines %(%S+ grid%): (%S+) s"))
    local diff = tonumber(out:match("max difference against A:dot%(B%): (%S+)"))
    if not t or not diff or diff > 1e-9 * n then error("bench: summa.lua failed:\n" .. out, 0) end
    local bytes, abc = out:match("bytes through the client: (%d+) %(A, B and C once: (%d+)%)")
    local inside = tonumber(out:match("on the engines: (%S+) s"))
    return t, tonumber(bytes), tonumber(abc), inside
  end

  local ok, err = pcall(function()
    -- SUMMA on 2 engines (a 1x2 grid) against OpenBLAS on 2 threads, alternating.
    local n = quick and 512 or 4096
    local c2 <close> = lpar.Cluster { launcher = "mpi", n = 2, profile = "mpi2" }
    local rc2 = c2:start_and_connect() -- closing it would stop the cluster
    local A, B = matrix.random(n, n, 1), matrix.random(n, n, 2)
    local before = matrix.blas_threads()
    local ts, tb, ti = {}, {}, {}
    for i = 1, quick and 1 or 3 do
      local t, _, _, inside = summa("mpi2", n)
      ts[i], ti[i] = t, inside
      matrix.blas_threads(2)
      local t0 = uv.hrtime()
      local _ = A:dot(B)
      tb[i] = (uv.hrtime() - t0) / 1e9
      matrix.blas_threads(before)
    end
    local gs, gb = 2 * n ^ 3 / median(ts) / 1e9, 2 * n ^ 3 / median(tb) / 1e9
    row("mpi_summa2", string.format("mpi: SUMMA n=%d on 2 MPI engines", n), gs, "GFLOP/s")
    row("mpi_summa2_blas", string.format("mpi: dgemm n=%d OpenBLAS, 2 threads", n), gb, "GFLOP/s")
    row("mpi_summa2_ratio", "mpi: SUMMA / OpenBLAS", gs / gb, "x", ">= 0.9x")
    row("mpi_summa2_engines", "mpi: SUMMA on 2 engines, time on the engines only", 2 * n ^ 3 / median(ti) / 1e9,
      "GFLOP/s")
    rc2:close()
    c2:stop()

    -- 4 engines: SUMMA's bytes through the client; allreduce of 1 MiB and of one number.
    local c4 <close> = lpar.Cluster { launcher = "mpi", n = 4, profile = "mpi4" }
    local rc = c4:start_and_connect()
    local _, bytes, abc = summa("mpi4", quick and 512 or 4096)
    row("mpi_summa4_client_bytes", "mpi: SUMMA on 4 engines, client bytes / (A+B+C)", bytes / abc, "x", "<= 1x")
    local view = rc:view()
    view.block = true
    local reps_big, reps_small = quick and 20 or 200, quick and 200 or 5000
    local times = view:apply(function(nbig, nsmall)
      local mpi, mat, clock = require "lpar.mpi", require "lpar.matrix", require "luv"
      local m = mat.random(128, 1024, mpi.rank + 1) -- 1 MiB
      local function per_call(f, reps)
        mpi.barrier()
        for _ = 1, 10 do f() end
        local t = {}
        for i = 1, 5 do
          mpi.barrier()
          local t0 = clock.hrtime()
          for _ = 1, reps // 5 do f() end
          t[i] = (clock.hrtime() - t0) / 1e3 / (reps // 5)
        end
        table.sort(t)
        return t[3]
      end
      return { per_call(function() return mpi.allreduce(m, "sum") end, nbig),
               per_call(function() return mpi.allreduce(1.5, "sum") end, nsmall) }
    end, reps_big, reps_small)
    local big, small = {}, {}
    for i, t in ipairs(times) do big[i], small[i] = t[1], t[2] end
    local m = matrix.random(128, 1024, 1)
    local copies = {}
    for i = 1, 50 do
      local t0 = uv.hrtime()
      local _ = m:copy()
      copies[i] = (uv.hrtime() - t0) / 1e3
    end
    local ab, cp = median(big), median(copies)
    row("mpi_allreduce_1mib", "mpi: allreduce 1 MiB matrix, 4 engines", ab, "us")
    row("mpi_memcpy_1mib", "mpi: memcpy 1 MiB here (A:copy())", cp, "us")
    row("mpi_allreduce_1mib_ratio", "mpi: allreduce 1 MiB / memcpy 1 MiB", ab / cp, "x")
    row("mpi_allreduce_small", "mpi: allreduce of one number, 4 engines", median(small), "us", "<= 20 us")
    rc:close()
  end)
  uv.os_unsetenv("LPAR_DIR")
  os.execute("rm -rf '" .. dir .. "'")
  if not ok then error(err, 0) end
end

-- Run alone: the same rows, printed.
if arg and arg[0] and arg[0]:match("bench_mpi%.lua$") then
  local quick = false
  for _, a in ipairs(arg) do if a == "--quick" then quick = true end end
  print(string.format("lpar %s lpar.mpi benchmarks, %s, %d CPUs%s", lpar.version, os.date("%Y-%m-%d %H:%M"),
    #uv.cpu_info(), quick and " (quick mode: figures are rough)" or ""))
  print(string.format("%-52s %12s %-8s %s", "measure", "median", "unit", "target"))
  bench_mpi(dofile("scripts/bench_harness.lua")(quick))
end

return bench_mpi
