local lpar = require "lpar"
local matrix = require "lpar.matrix"

describe("matrices on the wire", function()
  local rc, e0
  lazy_setup(function()
    rc = lpar.Cluster { n = 2 }:start_and_connect()
    e0 = rc[0]
    e0:execute("matrix = require 'lpar.matrix'", { block = true })
  end)
  lazy_teardown(function() rc:close() end)

  local function echo(...) return e0:apply_sync(function(...) return ... end, ...) end

  it("keep shapes and values, small and large, views and transposes", function()
    local big = matrix.random(1000, 600, 1) -- 4.8 MB: goes as shared memory
    for _, m in ipairs {
      matrix.from { { 1, 2, 3 }, { 4, 5, 6 } }, matrix.new(1, 1, 42), matrix.zeros(0, 5),
      matrix.zeros(3, 0), big, big:sub(11, 900, 31, 550), big:T(), big:tile(2, 3, 128, 128),
      matrix.random(5, 7, 2):sub(2, 4, 3, 6),
    } do
      local back = echo(m)
      assert.same({ m:shape() }, { back:shape() })
      assert.is_true(back == m)
    end
  end)

  it("give the engine a copy: its writes stay there", function()
    local a = matrix.random(512, 512, 3)
    local first = a:get(1, 1)
    e0:push({ a = a }, { block = true })
    e0:execute("a:set(1, 1, -1)", { block = true })
    assert.equal(first, a:get(1, 1))
    assert.equal(-1, e0:pull("a"):get():get(1, 1))
  end)

  it("keep the client's later writes from the engine's copy", function()
    local a = matrix.random(512, 512, 4)
    e0:push({ a = a }, { block = true })
    a:set(2, 2, -2)
    a:set_sub(3, 3, matrix.new(2, 2, -3))
    local there = e0:pull("a"):get()
    assert.is_true(there:get(2, 2) >= 0 and there:get(3, 3) >= 0)
    assert.equal(-2, a:get(2, 2))
  end)

  it("send a 64 MiB matrix and bring a result back", function()
    local a = matrix.ones(4096, 2048)
    local s = e0:apply_sync(function(m) return m:sum(), m * 2 end, a)
    assert.equal(4096 * 2048, s)
    local twice = select(2, e0:apply_sync(function(m) return m:sum(), m * 2 end, a))
    assert.equal(2, twice:get(4096, 2048))
  end)

  it("send the same matrix twice in one message as one matrix", function()
    local a = matrix.random(600, 600, 5)
    local same = e0:apply_sync(function(x, y) return rawequal(x, y) end, a, a)
    assert.is_true(same)
    local x, y = echo(a, a)
    assert.is_true(rawequal(x, y))
  end)

  it("carry a matrix inside tables and closures", function()
    local m = matrix.eye(3)
    local f = function() return m:sum() end
    assert.equal(3, e0:apply_sync(f))
    local t = e0:apply_sync(function(x) return x end, { m = m, list = { m } })
    assert.is_true(rawequal(t.m, t.list[1]))
  end)
end)
