local lpar = require "lpar"
local matrix = require "lpar.matrix"
local plot = require "lpar.plot"

local function png_size(data)
  assert.equal("\137PNG\r\n\26\n", data:sub(1, 8))
  local w, h = string.unpack(">I4I4", data, 17)
  return w, h
end

describe("lpar.plot.imshow", function()
  it("writes a PNG of the matrix, columns across and rows down", function()
    local path = os.tmpname()
    local png, w, h = plot.imshow(matrix.random(10, 20, 1), { file = path, scale = 3 })
    assert.same({ 60, 30 }, { w, h })
    local f = assert(io.open(path, "rb"))
    local data = f:read("a")
    f:close()
    os.remove(path)
    assert.equal(png, data)
    assert.same({ 60, 30 }, { png_size(data) })
  end)

  it("draws small matrices large enough to see", function()
    local _, w, h = plot.imshow(matrix.random(10, 10))
    assert.same({ 250, 250 }, { w, h })
  end)

  it("names what it cannot do", function()
    assert.has_error(function() plot.imshow({}) end, "imshow: expected a matrix, got table")
    assert.has_error(function() plot.imshow(matrix.eye(2), { interpolation = "bilinear" }) end,
      'imshow: only interpolation = "nearest" is supported, not bilinear')
    assert.has_error(function() plot.imshow(matrix.eye(2), { cmap = "jet" }) end)
    assert.has_error(function() plot.imshow(matrix.zeros(0, 3)) end)
  end)

  it("on an engine, attaches the image to the task", function()
    local rc <close> = lpar.Cluster { n = 2 }:start_and_connect()
    local ar = rc:view():execute([[
      require("lpar.plot").imshow(require("lpar.matrix").eye(4), { cmap = "gray", scale = 2 })
    ]], { block = true })
    assert.equal(2, #ar.outputs)
    for _, o in ipairs(ar.outputs) do
      assert.equal("image/png", o.type)
      assert.same({ 8, 8 }, { png_size(o.data) })
      assert.same({ 8, 8 }, { o.metadata.width, o.metadata.height })
    end
  end)
end)
