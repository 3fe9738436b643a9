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
    assert.matches("2048 KiB +[%d.]+ us +[%d.]+ GB/s", out)
  end)

  it("scripts/bench.lua --quick produces every figure", function()
    local out, code = helpers.run(helpers.lpar .. " scripts/bench.lua --quick 2>&1")
    assert.equal(0, code, out)
    for _, row in ipairs {
      "start 4 engines, all ready", "idle engine RSS", "round trip, 1 engine, p50",
      "round trip, 4 engines, p99", "execute%(\"\"%) blocking", "execute%(\"\"%) non%-blocking",
      "push 2 MiB string",
    } do
      assert.matches(row .. "[^\n]- +%d+%.%d+ ", out)
    end
  end)
end)
