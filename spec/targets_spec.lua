local targets = require "lpar.targets"

describe("target specifications", function()
  local ids = { 0, 1, 2, 3 }
  local function r(spec) return targets.resolve(spec, ids) end

  it("nil and 'all' mean every engine", function()
    assert.same(ids, r(nil))
    assert.same(ids, r("all"))
  end)

  it("take an id or a list of ids", function()
    assert.same({ 2 }, r(2))
    assert.same({ 3, 1 }, r({ 3, 1 }))
  end)

  it("read negative ids from the end, as rc[-1] does", function()
    assert.same({ 3 }, r(-1))
    assert.same({ 3 }, r("-1"))
  end)

  it("slice with Python semantics", function()
    assert.same({ 0, 1 }, r("0:2"))
    assert.same({ 2, 3 }, r("2:4"))
    assert.same({ 0, 2 }, r("::2"))
    assert.same({ 1, 3 }, r("1::2"))
    assert.same({ 1, 2, 3 }, r("1:"))
    assert.same({ 0, 1, 2 }, r(":-1"))
    assert.same({ 3, 2, 1, 0 }, r("::-1"))
    assert.same({}, r("5:9"))
  end)

  it("slice over the ids, not the id values", function()
    assert.same({ 5, 9 }, targets.resolve("1:3", { 2, 5, 9, 11 }))
  end)

  it("read comma lists", function()
    assert.same({ 0, 2, 3 }, r("0,2,3"))
    assert.same({ 0, 2 }, r("0, 2"))
  end)

  it("name what is wrong", function()
    assert.has_error(function() r(7) end, "no engine 7 (engines: 0 1 2 3)")
    assert.has_error(function() r("a:b") end, 'bad target "a:b": "a" is not an integer')
    assert.has_error(function() r("::0") end, "slice step cannot be zero")
    assert.has_error(function() r({ "x" }) end, "bad target list: element 1 is string, not an engine id")
    assert.has_error(function() r(true) end)
  end)
end)
