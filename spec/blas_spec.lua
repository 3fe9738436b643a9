--- OpenBLAS and its kernel: matrix.blas_info(), the OPENBLAS_CORETYPE lpar
-- sets from cpuid, a user's value kept, LPAR_BLAS_CORETYPE=off, engines
-- agreeing with their client, and results that do not depend on the kernel.
--
-- The kernel is fixed when a process loads OpenBLAS, and this machine's
-- environment may already set OPENBLAS_CORETYPE (and OPENBLAS_L2_SIZE,
-- which is left alone throughout). So every case that needs a given
-- environment runs `lpar` in a subprocess with that environment, made from
-- this one less the variables in play.
local lpar = require "lpar"
local matrix = require "lpar.matrix"
local helpers = require "helpers"

local scratch = os.tmpname()
os.remove(scratch)
assert(os.execute("mkdir -p '" .. scratch .. "'"))

teardown(function()
  helpers.run("LPAR_DIR='" .. scratch .. "/dir' " .. helpers.lpar .. " cluster stop --all >/dev/null 2>&1")
  os.execute("rm -rf '" .. scratch .. "'")
end)

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- What the kernel ought to be, from the kernel's own view of the CPU
-- (/proc/cpuinfo lists a feature only when the OS enabled its state).
local flags = {}
for flag in (read_file("/proc/cpuinfo") or ""):match("\nflags%s*:([^\n]*)"):gmatch("%S+") do flags[flag] = true end
local has_avx512 = flags.avx512f and flags.avx512bw and flags.avx512dq and flags.avx512vl
local has_avx2 = flags.avx2 and flags.fma
local best = has_avx512 and "SkylakeX" or has_avx2 and "Haswell" or nil
-- Kernels OpenBLAS falls back to on a CPU it does not know, or older ones.
local FALLBACKS = { Prescott = true, Katmai = true, Core2 = true, Penryn = true, Nehalem = true,
                    Sandybridge = true, Atom = true, Northwood = true, Banias = true }

-- Prints matrix.blas_info() as `info.KEY=VALUE` lines (the subprocess's side).
-- lpar.matrix is left to each chunk: loading it settles the kernel.
local PRELUDE = [[
local lpar = require "lpar"
local function dump(prefix, t)
  for k, v in pairs(t) do io.write(prefix, ".", k, "=", tostring(v), "\n") end
end
]]

--- Run `body` (after PRELUDE) with `./build/lpar` in this environment less
-- OPENBLAS_CORETYPE, LPAR_BLAS_CORETYPE and LPAR_BLAS_CHOSEN, plus `env`
-- ("NAME=value ..."). Returns the `KEY=VALUE` lines as a table, stderr, and
-- the exit code.
local function run(env, body)
  local path, err = scratch .. "/chunk.lua", scratch .. "/stderr"
  local f = assert(io.open(path, "w"))
  f:write(PRELUDE, body)
  f:close()
  local out, code = helpers.run(string.format(
    "env -u OPENBLAS_CORETYPE -u LPAR_BLAS_CORETYPE -u LPAR_BLAS_CHOSEN %s %s %s 2>%s",
    env or "", helpers.lpar, path, err))
  local fields = {}
  for k, v in out:gmatch("([%w_.]+)=([^\n]*)") do fields[k] = v end
  return fields, read_file(err) or "", code
end

local CLIENT_INFO = [[
local matrix = require "lpar.matrix"
dump("info", matrix.blas_info())
io.write("env.OPENBLAS_CORETYPE=", tostring(os.getenv("OPENBLAS_CORETYPE")), "\n")
]]

-- A client and two engines, each saying which kernel it runs.
local ENGINE_INFO = [[
-- The client loads lpar.matrix only after the engines are running.
local rc <close> = lpar.Cluster { n = 2, engine_env = ENGINE_ENV }:start_and_connect()
local matrix = require "lpar.matrix"
dump("client", matrix.blas_info())
local infos = rc:view():apply_sync(function() return require("lpar.matrix").blas_info() end)
for i, info in ipairs(infos) do dump("engine" .. (i - 1), info) end
-- What each engine was spawned with (/proc keeps the initial environment).
for _, id in ipairs(rc.ids) do
  local f = assert(io.open("/proc/" .. rc:queue_status()[id].pid .. "/environ", "rb"))
  local value = ("\0" .. f:read("a")):match("%zOPENBLAS_CORETYPE=(%Z*)")
  io.write("spawned", id, ".OPENBLAS_CORETYPE=", value or "nil", "\n")
  f:close()
end
]]

local function engines_with(env, engine_env)
  return run(env, "local ENGINE_ENV = " .. (engine_env or "nil") .. "\n" .. ENGINE_INFO)
end

describe("matrix.blas_info()", function()
  it("names the library, its version and configuration, the kernel and the thread count", function()
    local info = assert(matrix.blas_info())
    assert.equal("OpenBLAS", info.vendor)
    assert.matches("^%d+%.%d+%.%d+", info.version)
    assert.matches("^OpenBLAS " .. info.version:gsub("%.", "%%."), info.config)
    assert.matches("^/", info.path)
    assert.truthy(read_file(info.file), "the library file can be read: " .. tostring(info.file))
    assert.matches("^%a[%w_]*$", info.kernel)
    assert.equal(matrix.blas_threads(), info.threads)
    assert.truthy(({ user = true, lpar = true, openblas = true })[info.chosen_by])
    assert.equal("string", type(info.reason))
    assert.matches("AVX2%+FMA", info.cpu)
    assert.equal(best, info.cpu_kernel)
  end)

  it("says who chose the kernel in this very process, whose environment it keeps", function()
    local given = os.getenv("OPENBLAS_CORETYPE")
    local info = matrix.blas_info()
    assert.equal(given, os.getenv("OPENBLAS_CORETYPE"))
    if given == nil then -- nobody set it, and lpar found nothing to set
      assert.equal("openblas", info.chosen_by)
    elseif os.getenv("LPAR_BLAS_CHOSEN") == given then
      assert.equal("lpar", info.chosen_by)
    else
      assert.equal("user", info.chosen_by)
      assert.equal(given, info.coretype)
      assert.matches("set by the user: kept", info.reason)
    end
  end)

  it("follows matrix.blas_threads", function()
    local before = matrix.blas_threads()
    matrix.blas_threads(1)
    assert.equal(1, matrix.blas_info().threads)
    matrix.blas_threads(before)
    assert.equal(before, matrix.blas_info().threads)
  end)
end)

describe("the kernel lpar chooses", function()
  it("is the best this CPU runs, not a fallback, when nobody set OPENBLAS_CORETYPE", function()
    local f, err, code = run("", CLIENT_INFO)
    assert.equal(0, code, err)
    if not best then
      assert.equal("openblas", f["info.chosen_by"])
      return
    end
    assert.equal(best, f["info.kernel"])
    assert.is_nil(FALLBACKS[f["info.kernel"]])
    assert.equal("lpar", f["info.chosen_by"])
    assert.equal(best, f["info.coretype"])
    assert.equal(best, f["env.OPENBLAS_CORETYPE"])
    assert.matches("lpar set OPENBLAS_CORETYPE=" .. best, f["info.reason"])
    assert.matches("LPAR_BLAS_CORETYPE=off", f["info.reason"])
  end)

  it("keeps a user's OPENBLAS_CORETYPE exactly as given", function()
    -- Lower case on purpose: OpenBLAS takes any case, and lpar changes nothing.
    local f, err, code = run("OPENBLAS_CORETYPE=sandybridge", CLIENT_INFO)
    assert.equal(0, code, err)
    assert.equal("Sandybridge", f["info.kernel"])
    assert.equal("sandybridge", f["env.OPENBLAS_CORETYPE"])
    assert.equal("sandybridge", f["info.coretype"])
    assert.equal("user", f["info.chosen_by"])
    assert.matches("set by the user: kept", f["info.reason"])
  end)

  it("is OpenBLAS's own with LPAR_BLAS_CORETYPE=off", function()
    local f, err, code = run("LPAR_BLAS_CORETYPE=off OPENBLAS_VERBOSE=2", CLIENT_INFO)
    assert.equal(0, code, err)
    local own = err:match("Core: (%S+)")
    assert.truthy(own, "OpenBLAS names the core it picked: " .. err)
    assert.equal(own, f["info.kernel"])
    assert.equal("nil", f["env.OPENBLAS_CORETYPE"])
    assert.is_nil(f["info.coretype"])
    assert.equal("openblas", f["info.chosen_by"])
    assert.matches("LPAR_BLAS_CORETYPE=off", f["info.reason"])
  end)

  it("is the client's on every engine, chosen by lpar, a user or OpenBLAS", function()
    for _, env in ipairs { "", "OPENBLAS_CORETYPE=Sandybridge", "LPAR_BLAS_CORETYPE=off" } do
      local f, err, code = engines_with(env)
      assert.equal(0, code, err)
      assert.truthy(f["client.kernel"], err)
      for i, e in ipairs { "engine0", "engine1" } do
        -- Inherited from the client, not found again by each engine.
        assert.equal(f["client.coretype"] or "nil", f["spawned" .. (i - 1) .. ".OPENBLAS_CORETYPE"], env)
        assert.equal(f["client.kernel"], f[e .. ".kernel"], env)
        assert.equal(f["client.chosen_by"], f[e .. ".chosen_by"], env)
        assert.equal(f["client.coretype"], f[e .. ".coretype"], env)
        assert.equal("1", f[e .. ".threads"])
      end
    end
  end)

  it("is OpenBLAS's own on engines started with LPAR_BLAS_CORETYPE=off by a client that chose", function()
    local own = run("LPAR_BLAS_CORETYPE=off", CLIENT_INFO)["info.kernel"]
    local f, err, code = engines_with("", '{ "LPAR_BLAS_CORETYPE=off" }')
    assert.equal(0, code, err)
    if best then assert.equal(best, f["client.kernel"]) end
    for _, e in ipairs { "engine0", "engine1" } do
      assert.equal(own, f[e .. ".kernel"])
      assert.equal("openblas", f[e .. ".chosen_by"])
    end
  end)

  it("reaches the engines of a standalone cluster through the controller's environment", function()
    local dir = scratch .. "/dir"
    local _, err, code = run("LPAR_DIR=" .. dir, [[
assert(os.execute(require("luv").exepath() .. " cluster start -n 1 --daemonize --profile blas >/dev/null"))
]])
    assert.equal(0, code, err)
    -- A client that would not choose: the engine's kernel is the controller's.
    local f
    f, err, code = run("LPAR_DIR=" .. dir .. " OPENBLAS_CORETYPE=Sandybridge", [[
local rc = lpar.Client { profile = "blas" }
local f = assert(io.open("/proc/" .. rc:queue_status()[0].pid .. "/environ", "rb"))
io.write("spawned.OPENBLAS_CORETYPE=", ("\0" .. f:read("a")):match("%zOPENBLAS_CORETYPE=(%Z*)") or "nil", "\n")
f:close()
dump("engine", rc[0]:apply_sync(function() return require("lpar.matrix").blas_info() end))
rc:shutdown()
rc:close()
]])
    assert.equal(0, code, err)
    if best then
      assert.equal(best, f["spawned.OPENBLAS_CORETYPE"]) -- from the controller, at spawn
      assert.equal(best, f["engine.kernel"])
      assert.equal("lpar", f["engine.chosen_by"])
    else
      assert.equal("openblas", f["engine.chosen_by"])
    end
  end)
end)

describe("the BLAS lpar loads", function()
  -- Debian's reference BLAS, which the alternatives can point libblas.so.3 at.
  local REFERENCE = "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"

  it("is the one Debian's alternatives name (libblas.so.3), by default", function()
    local info = assert(matrix.blas_info())
    assert.matches("/libc?blas%.so%.3$", info.path)
    local target = helpers.run("readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3"):gsub("%s+$", "")
    assert.equal(target, info.file)
  end)

  it("is the one LPAR_BLAS names, with no thread control when it is not OpenBLAS, on engines too", function()
    local body = [[
local matrix = require "lpar.matrix"
dump("info", matrix.blas_info())
local ok, why = matrix.blas_threads(2)
io.write("threads.ok=", tostring(ok), "\n", "threads.why=", tostring(why), "\n")
local a = matrix.random(64, 64, 5)
io.write("sum.client=", string.format("%.17g", a:dot(a):sum()), "\n")
local rc <close> = lpar.Cluster { n = 1 }:start_and_connect()
io.write("sum.engine=", string.format("%.17g", rc[0]:apply_sync(function(m) return m:dot(m):sum() end, a)), "\n")
io.write("engine.path=", rc[0]:apply_sync(function() return require("lpar.matrix").blas_info().path end), "\n")
]]
    local out, err, code = run("LPAR_BLAS=" .. REFERENCE, body)
    assert.equal(0, code, err)
    assert.equal(REFERENCE, out["info.path"])
    assert.equal("not OpenBLAS", out["info.vendor"])
    assert.is_nil(out["info.threads"])
    assert.equal("nil", out["threads.ok"])
    assert.matches("no thread control", out["threads.why"])
    assert.equal(REFERENCE, out["engine.path"])
    local a = matrix.random(64, 64, 5)
    local expect = a:dot(a):sum()
    assert.is_true(math.abs(tonumber(out["sum.client"]) - expect) <= 1e-12 * math.abs(expect))
    assert.equal(out["sum.client"], out["sum.engine"])
  end)

  it("is named in the error when LPAR_BLAS cannot be loaded", function()
    local out, err, code = run("LPAR_BLAS=/nonexistent/libblas.so",
      "local matrix = require 'lpar.matrix'\nio.write('err=', select(2, matrix.blas_info()), '\\n')")
    assert.equal(0, code, err)
    assert.matches("cannot load the BLAS LPAR_BLAS names: /nonexistent/libblas.so", out.err)
  end)
end)

describe("products with and without lpar's kernel", function()
  -- Odd sizes, so the kernels' edge cases run too; seeds fix the values.
  local PRODUCT = [[
local matrix = require "lpar.matrix"
local m, k, n = 301, 257, 199
local C = matrix.random(m, k, 11):dot(matrix.random(k, n, 12))
local f = assert(io.open(OUT, "wb"))
f:write(lpar.encode(C))
f:close()
-- A naive triple loop on a small product, against this kernel.
local a, b = matrix.random(37, 53, 13), matrix.random(53, 41, 14)
local c, worst = a:dot(b), 0
for i = 1, 37 do
  for j = 1, 41 do
    local s = 0.0
    for p = 1, 53 do s = s + a:get(i, p) * b:get(p, j) end
    worst = math.max(worst, math.abs(s - c:get(i, j)))
  end
end
dump("info", matrix.blas_info())
io.write("naive.worst=", string.format("%.17g", worst), "\n")
]]

  local function product(env, name)
    local out = scratch .. "/" .. name .. ".bin"
    local f, err, code = run(env, "local OUT = '" .. out .. "'\n" .. PRODUCT)
    assert.equal(0, code, err)
    local ok, C = lpar.decode(assert(read_file(out)))
    assert(ok, C)
    return C, f
  end

  it("agree to rounding, and with a naive loop", function()
    local chosen, fc = product("", "chosen")
    local own, fo = product("LPAR_BLAS_CORETYPE=off", "own")
    local old, fp = product("OPENBLAS_CORETYPE=Prescott", "prescott") -- SSE3 only: another code path
    if best then
      assert.equal(best, fc["info.kernel"])
      assert.equal("Prescott", fp["info.kernel"])
    end
    assert.same({ 301, 199 }, { chosen:shape() })
    -- Sums of 257 products of numbers in [0, 1): differences are a few ulps of ~64.
    local tol = 257 * 2 ^ -52 * 4
    assert.is_true(chosen:max_abs_diff(own) <= tol, fc["info.kernel"] .. " vs " .. fo["info.kernel"])
    assert.is_true(chosen:max_abs_diff(old) <= tol, fc["info.kernel"] .. " vs Prescott")
    for _, f in ipairs { fc, fo, fp } do
      assert.is_true(tonumber(f["naive.worst"]) <= 53 * 2 ^ -52 * 16, f["info.kernel"])
    end
  end)
end)

describe("scripts/bench_blas.lua", function()
  it("says which kernel the client and the engines run, above and beside the figures", function()
    local out, code = helpers.run(helpers.lpar .. " scripts/bench_blas.lua --quick 2>&1")
    assert.equal(0, code, out)
    local kernel = matrix.blas_info().kernel
    assert.matches("\nBLAS: OpenBLAS [%d.]+ %(/[^\n]*%), kernel " .. kernel .. ", chosen by %a+\n", out)
    assert.matches("A:dot%(B%) n=512, 2 threads +%d+%.%d+ GFLOP/s", out)
    assert.matches("tiled on 2 engines %[" .. kernel .. "%] +%d+%.%d+ GFLOP/s", out)
    assert.matches("engines' kernel: " .. kernel .. " " .. kernel .. "\n", out)
  end)
end)
