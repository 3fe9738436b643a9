local lpar = require "lpar"
local timeit = require "lpar.timeit"

describe("lpar.timeit", function()
  it("prints IPython's line and returns the figures", function()
    local printed
    local real_print = print
    _G.print = function(s) printed = s end
    local calls = 0
    local r = lpar.timeit(function() calls = calls + 1 end, { number = 100, rep = 3 })
    _G.print = real_print
    assert.equal(300, calls)
    assert.equal(100, r.loops)
    assert.equal(3, r.rep)
    assert.equal(3, #r.all)
    assert.is_true(r.best > 0 and r.best <= math.min(table.unpack(r.all)))
    assert.matches("^100 loops, best of 3: [%d.]+ %S+ per loop$", printed)
  end)

  it("picks the loop count by itself, in powers of ten", function()
    local r = lpar.timeit(function() end, { quiet = true })
    assert.is_true(r.loops >= 1000)
    assert.equal(0, math.log(r.loops, 10) % 1)
  end)

  it("formats times with a sensible unit", function()
    assert.equal("41.0 µs", timeit.format_time(41e-6))
    assert.equal("1.50 ms", timeit.format_time(1.5e-3))
    assert.equal("2.00 s", timeit.format_time(2))
    assert.equal("120 ns", timeit.format_time(1.2e-7))
  end)

  it("names bad arguments", function()
    assert.has_error(function() lpar.timeit(42) end, "timeit: expected a function, got number")
    assert.has_error(function() lpar.timeit(print, { number = 0 }) end, "timeit: number must be a positive integer")
  end)
end)
