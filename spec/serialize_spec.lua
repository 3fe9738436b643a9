-- luacheck: globals where
local lpar = require "lpar"

-- Send values to an engine and back: what a user's values go through.
describe("values on the wire", function()
  local rc, e0
  lazy_setup(function()
    rc = lpar.Cluster { n = 1 }:start_and_connect()
    e0 = rc[0]
  end)
  lazy_teardown(function() rc:close() end)

  local function echo(...) return e0:apply_sync(function(...) return ... end, ...) end

  it("keep nil, booleans, integers, floats and binary strings", function()
    local a, b, c, d, e, f, g = echo(nil, true, false, math.mininteger, -0.0, 1 / 0, "a\0b\255")
    assert.same({ nil, true, false, math.mininteger }, { a, b, c, d })
    assert.equal("float", math.type(e))
    assert.equal(-math.huge, 1 / e)
    assert.equal(math.huge, f)
    assert.equal("a\0b\255", g)
    local nan = echo(0 / 0)
    assert.is_true(nan ~= nan)
  end)

  it("bring a cyclic table back cyclic and shared references shared", function()
    local t = { name = "root" }
    t.self = t
    local shared = { 1, 2 }
    t.a, t.b = shared, shared
    local back = echo(t)
    assert.equal(back, back.self)
    assert.equal(back.a, back.b)
    assert.same({ 1, 2 }, back.a)
    assert.equal("root", back.name)
  end)

  it("keep closures' shared upvalues shared, on the engine and back", function()
    local n = 0
    local function inc() n = n + 1 end
    local function get() return n end
    -- Both closures travel in one message: on the engine they share one n.
    assert.equal(2, e0:apply_sync(function(i, g) i() i() return g() end, inc, get))
    -- And they come back still sharing it (a fresh copy, not ours).
    local inc2, get2 = echo(inc, get)
    inc2() inc2() inc2()
    assert.equal(3, get2())
    assert.equal(0, n)
  end)

  it("send recursive local functions", function()
    local function fib(k) if k < 2 then return k end return fib(k - 1) + fib(k - 2) end
    assert.equal(55, e0:apply_sync(fib, 10))
  end)

  it("rebind _ENV to the engine's globals", function()
    e0:execute("where = 'engine'", { block = true })
    where = "client"
    assert.equal("engine", e0:apply_sync(function() return where end))
    where = nil
  end)

  it("send C functions and library tables by name", function()
    local sin, str = echo(math.sin, string)
    assert.equal(math.sin, sin)
    assert.equal(string, str)
    assert.equal(0.0, e0:apply_sync(math.sin, 0.0))
  end)

  it("send registered metatables by name", function()
    local Point = {}
    Point.__index = Point
    function Point:norm2() return self.x * self.x + self.y * self.y end
    lpar.register_metatable("spec.Point", Point)
    e0:apply_sync(function(mt) lpar.register_metatable("spec.Point", mt) end, Point)
    local p = setmetatable({ x = 3, y = 4 }, Point)
    assert.equal(25, e0:apply_sync(function(q) return q:norm2() end, p))
    local back = echo(p)
    assert.equal(Point, getmetatable(back))
  end)

  it("refuse what cannot travel, naming its path", function()
    local fh = io.stdout
    local function f() return fh end
    local ok, err = pcall(e0.apply, e0, f)
    assert.is_false(ok)
    assert.equal("cannot send args[1].upvalue 'fh': userdata FILE*", err:match("cannot send.*$"))
    ok, err = pcall(e0.push, e0, { data = { 1, 2, coroutine.create(print) } })
    assert.is_false(ok)
    assert.matches("cannot send push%[1%]%.data%[3%]: coroutine", err)
    ok, err = pcall(e0.apply, e0, print, setmetatable({}, {}))
    assert.is_false(ok)
    assert.matches("args%[2%]: table has a metatable that is not registered", err)
  end)
end)

describe("lpar.encode and lpar.decode", function()
  it("round-trip in one process", function()
    local t = { 1, 2.5, "x", { y = true } }
    t[5] = t
    local s = assert(lpar.encode(t, 7))
    local ok, back, seven = lpar.decode(s)
    assert.is_true(ok)
    assert.equal(back, back[5])
    assert.same({ y = true }, back[4])
    assert.equal(7, seven)
  end)

  it("reject damaged input with a message, never crashing", function()
    local s = assert(lpar.encode({ "hello", { 1, 2, 3 }, 4.5 }))
    for cut = 0, #s - 1 do
      local ok, err = lpar.decode(s:sub(1, cut))
      assert.is_nil(ok)
      assert.is_string(err)
    end
    assert.is_nil((lpar.decode(s .. "x")))
    assert.is_nil((lpar.decode("\255\255\255\255")))
  end)
end)
