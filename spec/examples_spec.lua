local helpers = require "helpers"

describe("the examples", function()
  it("demo.lua runs to the end on four engines", function()
    local out, code = helpers.run(helpers.lpar .. " examples/demo.lua 2>&1")
    assert.equal(0, code, out)
    assert.matches("started 4 engines in [%d.]+ ms: ids 0 1 2 3", out)
    assert.matches("x on each engine: +0.0 1.0 4.0 9.0", out)
    assert.matches("scatter/square/gather: +1 4 9 16 25 36 49 64 81 100 121 144 169 196 225 256", out)
    assert.matches("%[stdout:1%] printed on engine 1", out)
    assert.matches("remote error: +%[1:execute%] %[execute%]:1: attempt to index a nil value", out)
    assert.matches("1 engine +[%d.]+ us +[%d.]+ us", out)
    assert.matches("tiled 1024x1024 product on 4 engines: [%d.]+ ms %([%d.]+ GFLOP/s%).-max difference %d", out)
    assert.matches("65536 KiB +[%d.]+ us +[%d.]+ GB/s", out)
  end)

  it("tutorial.lua walks through the notebook's steps", function()
    local out, code = helpers.run(helpers.lpar .. " examples/tutorial.lua 2>&1")
    assert.equal(0, code, out)
    assert.matches("engines: 0 1 2 3", out)
    assert.matches("importing lpar.matrix as matrix here and on engine%(s%) 0 1 2 3", out)
    assert.matches("%[stdout:1%] 10\t10\t10", out)
    assert.matches("pulled from engine 3: hello", out)
    assert.matches("200 loops, best of 3: [%d.]+ %S+ per loop", out)
    assert.matches("quadrants vs A:dot%(B%): max difference %S+", out)
    assert.matches("vars.k on engine 2: 3\n", out)
    assert.matches("remote square%(5%): 25 26 27 28\n", out)
    assert.matches("parallel map: 10 20 30 40 50 60\n", out)
    assert.matches("rc:wait%(%) for everything outstanding:\ttrue\n", out)
  end)

  it("latency.lua prints the timings and the bandwidth table", function()
    local out, code = helpers.run(helpers.lpar .. " examples/latency.lua 2 quick 2>&1")
    assert.equal(0, code, out)
    assert.matches("apply%(identity%) blocking, 1 engine +%d+ loops, best of 3: [%d.]+ %S+ per loop", out)
    assert.matches("\n +262144 +2097152 +[%d.]+ %S+ +[%d.]+ GB/s", out)
    assert.matches("bandwidth from [%d.]+ to [%d.]+ GB/s", out)
  end)

  it("matmul.lua checks its products at small sizes", function()
    local out, code = helpers.run(helpers.lpar .. " examples/matmul.lua 2 128 256 2>&1")
    assert.equal(0, code, out)
    assert.matches("n=16, 256 tasks of one element", out)
    assert.matches("n=128 by quadrants on 2 engines", out)
    assert.matches("n=256 tiled over 2 engines: [%d.]+ ms %([%d.]+ GFLOP/s%)", out)
  end)

  it("imshow.lua draws on every second engine", function()
    local out, code = helpers.run("LPAR_OUTPUT_DIR=$(mktemp -d) " .. helpers.lpar .. " examples/imshow.lua 4 2>&1")
    assert.equal(0, code, out)
    assert.matches("%[output:0%] [^\n]+%.png %(250x250%)\n%[output:2%] [^\n]+%.png %(250x250%)", out)
  end)

  it("standalone.lua keeps the engines' globals from one client to the next", function()
    local dir = os.tmpname()
    os.remove(dir)
    local out, code = helpers.run("LPAR_DIR='" .. dir .. "' " .. helpers.lpar .. " examples/standalone.lua 2>&1")
    os.execute("rm -rf '" .. dir .. "'")
    assert.equal(0, code, out)
    assert.matches("started <Cluster n=2 profile=example pid=%d+>", out)
    assert.matches("set by the first client on engine 0\nset by the first client on engine 1", out)
    assert.matches("results:\t2\t10", out)
    assert.matches("clients 2, messages refused 0\nstopped", out)
  end)

  it("scripts/bench.lua --quick produces every figure, and --json writes them", function()
    local json = os.tmpname()
    local out, code = helpers.run(helpers.lpar .. " scripts/bench.lua --quick --json " .. json .. " 2>&1")
    local f = assert(io.open(json))
    local doc = f:read("a")
    f:close()
    os.remove(json)
    assert.equal(0, code, out)
    local results = require("dkjson").decode(doc) -- valid JSON: no %q escapes, no inf
    assert.is_table(results, doc)
    assert.is_table(results.machine)
    local keys = {}
    for _, r in ipairs(results.lpar) do keys[r.key] = true end
    assert.is_true(keys.apply1_p50)
    assert.is_true(keys.standalone_push_2mib and keys.tcp_push_2mib and keys.standalone_idle_ticks)
    assert.matches("^%a", results.blas.kernel)
    assert.matches("\nBLAS: OpenBLAS [%d.]+ %(/[^\n]*%), kernel %a", out)
    for _, row in ipairs {
      "start 4 engines, all ready", "idle engine RSS", "round trip, 1 engine, p50",
      "round trip, 4 engines, p99", "execute%(\"\"%) blocking", "execute%(\"\"%) non%-blocking",
      "push 2 MiB string", "push 2 MiB matrix", "push 64 MiB matrix", "time ratio",
      "tiled on 2 engines", "OpenBLAS, 2 threads", "tiled / OpenBLAS",
      "tiny tasks, load%-balanced map", "makespan / ideal", "DirectView apply_async",
      "map of 20000 tiny tasks", "rate of the short map / rate of it", "client peak RSS growth during it",
      "client RSS growth after it is released", "imap of 20000 over an endless iterator",
      "two at once: the first's rate / the second's", "two at once, identity: the first's rate / the second's",
      "controller RSS growth over",
      "A:dot%(B%) n=512, 1 thread", "A:dot%(B%) n=512, 2 threads",
      "standalone: round trip / embedded, p50", "standalone: push 64 MiB / 2 MiB, time",
      "standalone: idle controller CPU over 2 s", "standalone TCP: push 2 MiB matrix",
      "mpi: SUMMA / OpenBLAS", "mpi: SUMMA on 4 engines, client bytes / %(A%+B%+C%)",
      "mpi: allreduce 1 MiB / memcpy 1 MiB", "mpi: allreduce of one number, 4 engines",
    } do
      assert.matches(row .. "[^\n]- +%-?%d+%.%d+ ", out)
    end
  end)
end)
