-- lpar.matrix: dense row-major matrices of doubles (lua/binding/matrix.c).
local matrix = require "lpar.matrix"

-- f() must fail with a message that contains `msg` and names this file as
-- the place of the call (errors are raised at the user's call site).
local function fails(msg, f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error: " .. msg)
  err = tostring(err)
  assert.truthy(err:find(msg, 1, true), "expected '" .. msg .. "' in '" .. err .. "'")
  assert.truthy(err:find("matrix_spec.lua:%d+: "), "no call site in '" .. err .. "'")
end

-- The product by a naive triple loop, as a table of rows.
local function naive_dot(a, b)
  local c = {}
  for i = 1, a.rows do
    c[i] = {}
    for j = 1, b.cols do
      local s = 0
      for k = 1, a.cols do s = s + a:get(i, k) * b:get(k, j) end
      c[i][j] = s
    end
  end
  return matrix.from(c)
end

describe("lpar.matrix", function()
  describe("constructors", function()
    it("new fills with a value, 0 by default", function()
      assert.same({ { 7, 7, 7 }, { 7, 7, 7 } }, matrix.new(2, 3, 7):totable())
      assert.same({ { 0, 0 } }, matrix.new(1, 2):totable())
    end)

    it("zeros, ones and eye", function()
      assert.same({ { 0, 0, 0 }, { 0, 0, 0 } }, matrix.zeros(2, 3):totable())
      assert.same({ { 1 }, { 1 } }, matrix.ones(2, 1):totable())
      assert.same({ { 1, 0, 0 }, { 0, 1, 0 }, { 0, 0, 1 } }, matrix.eye(3):totable())
      assert.same({ { 1 } }, matrix.eye(1):totable())
    end)

    it("from takes rows of numbers", function()
      local a = matrix.from { { 1, 2, 3 }, { 4, 5, 6 } }
      assert.equal(2, a.rows)
      assert.equal(3, a.cols)
      assert.equal(6, a:get(2, 3))
      assert.same({ { 1.5 } }, matrix.from({ { 1.5 } }):totable())
    end)

    it("allows matrices with no rows or no columns", function()
      for _, shape in ipairs { { 0, 3 }, { 2, 0 }, { 0, 0 } } do
        local r, c = shape[1], shape[2]
        for _, a in ipairs { matrix.new(r, c), matrix.zeros(r, c) } do
          assert.same({ r, c }, { a:shape() })
          assert.same({ r, c }, { a:copy():shape() })
          assert.same({ c, r }, { a:T():shape() })
          assert.equal(0, a:sum())
          assert.equal(0, a:norm())
        end
      end
      assert.same({}, matrix.zeros(0, 3):totable())
      assert.same({ {}, {} }, matrix.zeros(2, 0):totable())
      assert.same({ 0, 0 }, { matrix.from({}):shape() })
      assert.same({ 2, 0 }, { matrix.from({ {}, {} }):shape() })
      assert.equal("matrix(0x3)\n[]", tostring(matrix.zeros(0, 3)))
      assert.equal("matrix(2x0)\n[[],\n []]", tostring(matrix.zeros(2, 0)))
    end)

    it("block assembles blocks", function()
      local a = matrix.from { { 1, 2 }, { 3, 4 } }
      local b = matrix.from { { 5 }, { 6 } }
      local c = matrix.from { { 7, 8 } }
      local d = matrix.from { { 9 } }
      assert.same({ { 1, 2, 5 }, { 3, 4, 6 }, { 7, 8, 9 } },
        matrix.block({ { a, b }, { c, d } }):totable())
      assert.same({ { 1, 2, 1, 2 }, { 3, 4, 3, 4 } }, matrix.block({ { a, a } }):totable())
      assert.same({ 0, 0 }, { matrix.block({}):shape() })
    end)

    it("block takes views", function()
      local big = matrix.from { { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 } }
      local m = matrix.block { { big:sub(2, 3, 2, 3), big:sub(1, 2, 1, 1) } }
      assert.same({ { 5, 6, 1 }, { 8, 9, 4 } }, m:totable())
    end)

    describe("random", function()
      it("gives numbers in [0, 1)", function()
        local r = matrix.random(100, 50)
        for _, row in ipairs(r:totable()) do
          for _, x in ipairs(row) do assert.truthy(x >= 0 and x < 1) end
        end
        local mean = r:sum() / 5000
        assert.truthy(mean > 0.45 and mean < 0.55, mean)
      end)

      it("is reproducible with a seed, across processes too", function()
        assert.equal(matrix.random(4, 5, 42), matrix.random(4, 5, 42))
        assert.are_not.equal(matrix.random(4, 5, 42), matrix.random(4, 5, 43))
        -- fixed values: the generator is ours (xoshiro256**), not the C library's
        local r = matrix.random(1, 3, 1)
        local again = matrix.random(1, 3, 1)
        for j = 1, 3 do assert.equal(r:get(1, j), again:get(1, j)) end
        assert.same({ 0.702922 }, { tonumber(string.format("%.6g", r:get(1, 1))) })
      end)

      it("differs between calls without a seed", function()
        assert.are_not.equal(matrix.random(3, 3), matrix.random(3, 3))
      end)
    end)
  end)

  describe("fields and elements", function()
    local a
    before_each(function() a = matrix.from { { 1, 2, 3 }, { 4, 5, 6 } } end)

    it("has rows, cols, shape and # (the number of rows)", function()
      assert.equal(2, a.rows)
      assert.equal(3, a.cols)
      assert.same({ 2, 3 }, { a:shape() })
      assert.equal(2, #a)
      assert.is_nil(a.nothing)
    end)

    it("gets and sets elements", function()
      assert.equal(1, a:get(1, 1))
      assert.equal(6, a:get(2, 3))
      a:set(2, 1, -0.5)
      assert.equal(-0.5, a:get(2, 1))
      assert.same({ { 1, 2, 3 }, { -0.5, 5, 6 } }, a:totable())
    end)

    it("copies are independent", function()
      local b = a:copy()
      b:set(1, 1, 100)
      assert.equal(1, a:get(1, 1))
      assert.equal(100, b:get(1, 1))
    end)

    it("T is a transposed copy", function()
      local t = a:T()
      assert.same({ { 1, 4 }, { 2, 5 }, { 3, 6 } }, t:totable())
      t:set(1, 1, 9)
      assert.equal(1, a:get(1, 1))
      local big = matrix.random(70, 45, 3)
      local bt = big:T()
      assert.equal(big:get(70, 1), bt:get(1, 70))
      assert.equal(big, bt:T())
    end)

    it("tells matrices from other values", function()
      assert.is_true(matrix.ismatrix(a))
      assert.is_true(matrix.ismatrix(a:sub(1, 1)))
      assert.is_false(matrix.ismatrix({}))
      assert.is_false(matrix.ismatrix(io.stdout))
    end)
  end)

  describe("views", function()
    local a
    before_each(function()
      a = matrix.from { { 1, 2, 3, 4 }, { 5, 6, 7, 8 }, { 9, 10, 11, 12 } }
    end)

    it("sub takes inclusive ranges, all columns by default", function()
      assert.same({ { 6, 7 }, { 10, 11 } }, a:sub(2, 3, 2, 3):totable())
      assert.same({ { 5, 6, 7, 8 } }, a:sub(2, 2):totable())
      assert.same({ 0, 4 }, { a:sub(2, 1):shape() })
      assert.same({ 3, 0 }, { a:sub(1, 3, 5, 4):shape() })
    end)

    it("write through to their parent, and see its writes", function()
      local v = a:sub(2, 3, 2, 3)
      v:set(1, 1, -6)
      assert.equal(-6, a:get(2, 2))
      a:set(3, 3, -11)
      assert.equal(-11, v:get(2, 2))
      local vv = v:sub(2, 2, 1, 2)
      vv:set(1, 1, 0)
      assert.equal(0, a:get(3, 2))
    end)

    it("copy and T of a view are contiguous copies", function()
      local v = a:sub(1, 3, 2, 3)
      assert.same({ { 2, 3 }, { 6, 7 }, { 10, 11 } }, v:copy():totable())
      assert.same({ { 2, 6, 10 }, { 3, 7, 11 } }, v:T():totable())
    end)

    it("tile cuts a grid, edge tiles smaller", function()
      assert.same({ { 1, 2 }, { 5, 6 } }, a:tile(1, 1, 2, 2):totable())
      assert.same({ { 3, 4 }, { 7, 8 } }, a:tile(1, 2, 2, 2):totable())
      assert.same({ { 9, 10 } }, a:tile(2, 1, 2, 2):totable())
      assert.same({ { 4 }, { 8 } }, a:tile(1, 2, 2, 3):totable())
      a:tile(2, 2, 2, 2):set(1, 2, 0)
      assert.equal(0, a:get(3, 4))
    end)

    it("outlive their collected parent", function()
      local v
      do
        local parent = matrix.from { { 1, 2 }, { 3, 4 } }
        v = parent:sub(2, 2, 1, 2)
      end
      collectgarbage()
      collectgarbage()
      assert.same({ { 3, 4 } }, v:totable())
      assert.equal(7, v:sum())
    end)

    it("set_sub copies a block in, through views too", function()
      a:set_sub(2, 3, matrix.from { { 0, 0 }, { 0, 0 } })
      assert.same({ { 1, 2, 3, 4 }, { 5, 6, 0, 0 }, { 9, 10, 0, 0 } }, a:totable())
      local v = a:sub(1, 2, 1, 2)
      assert.equal(v, v:set_sub(1, 1, matrix.ones(1, 2)))
      assert.same({ 1, 1, 3, 4 }, a:totable()[1])
    end)

    it("set_sub copies correctly from an overlapping view", function()
      a:set_sub(1, 2, a:sub(1, 3, 1, 3))
      assert.same({ { 1, 1, 2, 3 }, { 5, 5, 6, 7 }, { 9, 9, 10, 11 } }, a:totable())
    end)

    it("close frees at the end of a scope", function()
      local outside
      do
        local m <close> = matrix.ones(2, 2)
        outside = m
        assert.equal(4, m:sum())
      end
      fails("use of a closed matrix", function() return outside:sum() end)
      assert.is_false(matrix.ismatrix(outside))
    end)
  end)

  describe("dot", function()
    it("multiplies small matrices", function()
      local a = matrix.from { { 1, 2 }, { 3, 4 } }
      local b = matrix.from { { 5, 6 }, { 7, 8 } }
      assert.same({ { 19, 22 }, { 43, 50 } }, a:dot(b):totable())
      local c = matrix.from { { 1, 2, 3 }, { 4, 5, 6 } }
      assert.same({ { 14, 32 }, { 32, 77 } }, c:dot(c:T()):totable())
      assert.same({ { 6 } }, matrix.from({ { 2 } }):dot(matrix.from { { 3 } }):totable())
    end)

    it("agrees with a naive loop on random 7x5 * 5x3", function()
      local a, b = matrix.random(7, 5, 1), matrix.random(5, 3, 2)
      assert.truthy(a:dot(b):max_abs_diff(naive_dot(a, b)) < 1e-12)
    end)

    it("works on strided views", function()
      local big = matrix.random(12, 11, 7)
      local a, b = big:sub(2, 8, 3, 7), big:sub(4, 8, 1, 9)
      local r = a:dot(b)
      assert.same({ 7, 9 }, { r:shape() })
      assert.truthy(r:max_abs_diff(a:copy():dot(b:copy())) < 1e-12)
      assert.truthy(r:max_abs_diff(naive_dot(a, b)) < 1e-12)
    end)

    it("uses dgemv for a single column or row, views too", function()
      local big = matrix.random(9, 8, 11)
      local a = big:sub(1, 6, 2, 6)
      local col = big:sub(2, 6, 8, 8)        -- a column with a stride of 8
      local row = big:sub(7, 7, 1, 6)        -- a single row of a view
      local r1 = a:dot(col)
      assert.same({ 6, 1 }, { r1:shape() })
      assert.truthy(r1:max_abs_diff(naive_dot(a, col)) < 1e-12)
      local r2 = row:dot(a)
      assert.same({ 1, 5 }, { r2:shape() })
      assert.truthy(r2:max_abs_diff(naive_dot(row, a)) < 1e-12)
      local r3 = big:sub(9, 9, 1, 5):dot(col) -- 1x5 * 5x1
      assert.truthy(r3:max_abs_diff(naive_dot(big:sub(9, 9, 1, 5), col)) < 1e-12)
    end)

    it("gives zeros for an inner dimension of 0, and empty results", function()
      assert.same({ { 0, 0, 0 }, { 0, 0, 0 } }, matrix.zeros(2, 0):dot(matrix.zeros(0, 3)):totable())
      assert.same({ 0, 4 }, { matrix.zeros(0, 3):dot(matrix.ones(3, 4)):shape() })
    end)
  end)

  describe("arithmetic", function()
    local a, b
    before_each(function()
      a = matrix.from { { 1, 2, 3 }, { 4, 5, 6 } }
      b = matrix.from { { 0.5, -1, 2 }, { 0, 10, -6 } }
    end)

    it("adds, subtracts, scales and negates", function()
      assert.same({ { 1.5, 1, 5 }, { 4, 15, 0 } }, (a + b):totable())
      assert.same({ { 0.5, 3, 1 }, { 4, -5, 12 } }, (a - b):totable())
      assert.same({ { 2, 4, 6 }, { 8, 10, 12 } }, (a * 2):totable())
      assert.same({ { 0.5, 1, 1.5 }, { 2, 2.5, 3 } }, (0.5 * a):totable())
      assert.same({ { -1, -2, -3 }, { -4, -5, -6 } }, (-a):totable())
      assert.same({ { 1, 2, 3 }, { 4, 5, 6 } }, a:totable()) -- operands unchanged
    end)

    it("works on views", function()
      local big = matrix.from { { 1, 2, 3 }, { 4, 5, 6 }, { 7, 8, 9 } }
      local v, w = big:sub(1, 2, 1, 2), big:sub(2, 3, 2, 3)
      assert.same({ { 6, 8 }, { 12, 14 } }, (v + w):totable())
      assert.same({ { -4, -4 }, { -4, -4 } }, (v - w):totable())
      assert.same({ { 3, 6 }, { 12, 15 } }, (v * 3):totable())
      assert.equal(v + w, w + v)
    end)

    it("compares by shape and elements", function()
      assert.is_true(a == a:copy())
      assert.is_false(a == b)
      assert.is_false(matrix.zeros(2, 3) == matrix.zeros(3, 2))
      assert.is_true(matrix.zeros(0, 2) == matrix.zeros(0, 2))
      assert.is_true(a:sub(1, 1) == matrix.from { { 1, 2, 3 } })
    end)

    it("max_abs_diff, norm and sum", function()
      assert.equal(12, a:max_abs_diff(b))
      assert.equal(0, a:max_abs_diff(a:copy()))
      assert.equal(5, matrix.from({ { 3 }, { 4 } }):norm())
      assert.equal(math.sqrt(91), a:norm())
      assert.equal(21, a:sum())
      assert.equal(5.5, b:sum())
      -- no overflow or underflow in the squares
      assert.truthy(math.abs(matrix.from({ { 3e200, 4e200 } }):norm() / 5e200 - 1) < 1e-15)
      assert.truthy(math.abs(matrix.from({ { 3e-200, 4e-200 } }):norm() / 5e-200 - 1) < 1e-15)
      local n = matrix.from { { 1, 0 / 0 } }
      assert.is_true(n:max_abs_diff(matrix.zeros(1, 2)) ~= n:max_abs_diff(matrix.zeros(1, 2)))
    end)
  end)

  describe("tostring", function()
    it("prints small matrices whole, cells aligned", function()
      assert.equal("matrix(2x2)\n[[1, 2],\n [3, 4]]", tostring(matrix.from { { 1, 2 }, { 3, 4 } }))
      -- one width for all cells, as numpy does
      assert.equal("matrix(2x2)\n[[  1,  -2],\n [0.5,  30]]",
        tostring(matrix.from { { 1, -2 }, { 0.5, 30 } }))
      assert.equal("matrix(1x1)\n[[0.1]]", tostring(matrix.from { { 0.1 } }))
    end)

    it("elides rows and columns beyond six", function()
      local s = tostring(matrix.eye(10))
      assert.equal(table.concat({
        "matrix(10x10)",
        "[[1, 0, 0, ..., 0, 0, 0],",
        " [0, 1, 0, ..., 0, 0, 0],",
        " [0, 0, 1, ..., 0, 0, 0],",
        " ...,",
        " [0, 0, 0, ..., 1, 0, 0],",
        " [0, 0, 0, ..., 0, 1, 0],",
        " [0, 0, 0, ..., 0, 0, 1]]" }, "\n"), s)
      assert.equal(3, select(2, tostring(matrix.zeros(3, 100)):gsub("%.%.%.", "")))
      assert.equal(7, select(2, tostring(matrix.zeros(1000, 1)):gsub("\n", "")))
    end)
  end)

  describe("errors", function()
    local a
    before_each(function() a = matrix.zeros(3, 3) end)

    it("on bad indices, with the index and the bounds", function()
      fails("get: index (4, 1) out of bounds for 3x3", function() return a:get(4, 1) end)
      fails("get: index (0, 1) out of bounds for 3x3", function() return a:get(0, 1) end)
      fails("set: index (1, 9) out of bounds for 3x3", function() a:set(1, 9, 0) end)
      fails("get: index (1.5, 1) must be two integers", function() return a:get(1.5, 1) end)
      fails("get: index (nil, nil) must be two integers", function() return a:get() end)
    end)

    it("on bad sizes", function()
      fails("new: rows must be >= 0, got -1", function() return matrix.new(-1, 2) end)
      fails("zeros: cols must be an integer, got 2.5", function() return matrix.zeros(2, 2.5) end)
      fails("ones: rows must be an integer, got string", function() return matrix.ones("2", 2) end)
      fails("random: rows must be an integer, got nil", function() return matrix.random() end)
      fails("new: a 2097152x1048576 matrix is too large (at most 2^40 elements)",
        function() return matrix.new(2 ^ 21, 2 ^ 20) end)
      fails("eye: n = 2199023255553 is too large", function() return matrix.eye(2 ^ 41 + 1) end)
    end)

    it("on ragged or bad rows in from", function()
      fails("from: row 2 has length 1, but row 1 has length 2",
        function() return matrix.from { { 1, 2 }, { 3 } } end)
      fails("from: element (1, 2) is a string, not a number",
        function() return matrix.from { { 1, "x" } } end)
      fails("from: row 1 is a number, not a table of numbers", function() return matrix.from { 1 } end)
    end)

    it("on blocks that do not fit", function()
      local a22, a12, a21 = matrix.zeros(2, 2), matrix.zeros(1, 2), matrix.zeros(2, 1)
      fails("block: block (1, 2) is 1x2, but block (1, 1) in its row has 2 rows",
        function() return matrix.block { { a22, a12 } } end)
      fails("block: block (2, 1) is 2x1, but block (1, 1) in its column has 2 columns",
        function() return matrix.block { { a22 }, { a21 } } end)
      fails("block: row 2 has 1 blocks, but row 1 has 2",
        function() return matrix.block { { a22, a22 }, { a22 } } end)
      fails("block: block (1, 2) is a number, not a matrix",
        function() return matrix.block { { a22, 3 } } end)
      local tall = matrix.zeros(2 ^ 40, 0) -- no elements, so it exists
      fails("block: the result is too large", function() return matrix.block { { tall }, { tall } } end)
    end)

    it("on shapes that do not match", function()
      fails("dot: shapes 3x4 and 5x2 do not align (4 ~= 5)",
        function() return matrix.zeros(3, 4):dot(matrix.zeros(5, 2)) end)
      fails("add: shapes 3x3 and 2x3 differ", function() return a + matrix.zeros(2, 3) end)
      fails("sub: shapes 3x3 and 3x2 differ", function() return a - matrix.zeros(3, 2) end)
      fails("max_abs_diff: shapes 3x3 and 1x1 differ", function() return a:max_abs_diff(matrix.eye(1)) end)
      fails("add: both operands must be matrices, got a number", function() return a + 1 end)
      fails("use A:dot(B) for the product", function() return a * a end)
      fails("mul: cannot multiply a matrix by a string", function() return a * "2" end)
    end)

    it("on views out of range", function()
      fails("sub: rows 2..4 out of bounds for 3x3", function() return a:sub(2, 4) end)
      fails("sub: columns 0..1 out of bounds for 3x3", function() return a:sub(1, 2, 0, 1) end)
      fails("tile: tile (3, 1) out of bounds: 2x2 tiles of 2x2 cover 3x3",
        function() return a:tile(3, 1, 2, 2) end)
      fails("tile: tile size 0x1 must be at least 1x1", function() return a:tile(1, 1, 0, 1) end)
      fails("set_sub: a 2x2 block at (3, 1) does not fit in 3x3",
        function() return a:set_sub(3, 1, matrix.eye(2)) end)
    end)

    it("on values that are not matrices", function()
      fails("lpar.matrix expected, got table", function() return a:dot({}) end)
    end)
  end)

  it("big temporaries are collected as they go, not piled up", function()
    local a = matrix.zeros(1024, 1024) -- 8 MiB
    local alive = setmetatable({}, { __mode = "k" })
    for _ = 1, 40 do alive[a * 2] = true end
    local n = 0
    for _ in pairs(alive) do n = n + 1 end
    assert.truthy(n < 10, n .. " of 40 temporaries still alive")
  end)

  it("blas_threads reads and sets OpenBLAS's thread count", function()
    local n = matrix.blas_threads()
    assert.truthy(n >= 1)
    assert.equal(1, matrix.blas_threads(1))
    assert.equal(1, matrix.blas_threads())
    assert.equal(n, matrix.blas_threads(n))
    fails("blas_threads: need a count from 1 to 4096, got 0", function() return matrix.blas_threads(0) end)
  end)
end)
