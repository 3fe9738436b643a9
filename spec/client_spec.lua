-- Globals of the engines, read by functions that run there:
-- luacheck: globals part
local lpar = require "lpar"
local uv = require "luv"
local helpers = require "helpers"

describe("a local cluster", function()
  local cluster, rc, dview

  lazy_setup(function()
    cluster = lpar.Cluster { n = 4 }
    rc = cluster:start_and_connect()
    dview = rc:view()
  end)

  lazy_teardown(function()
    rc:close()
  end)

  it("starts four engines with ids 0 to 3", function()
    assert.same({ 0, 1, 2, 3 }, rc.ids)
    assert.equal(4, #rc)
  end)

  it("sends a function's bytecode once per engine, and again to an engine that restarted", function()
    local function received(id)
      return rc[id]:apply_sync(function() return lpar.engine.functions_received() end)
    end
    local before = received(1)
    local f = function(x) return x * 3 end
    for i = 1, 50 do assert.equal(3 * i, rc[1]:apply_sync(f, i)) end
    local g = function(x) return x - 1 end
    assert.same({ 0, 1, 2 }, rc:load_balanced_view(1):map_sync(g, { 1, 2, 3 }))
    -- f and g came once each; the counting function had come before.
    assert.equal(before + 2, received(1))
    cluster:restart_engines { 1 }
    local fresh = received(1)
    assert.equal(3, rc[1]:apply_sync(f, 1))
    assert.equal(fresh + 1, received(1))
  end)

  it("runs the function it was given when the slot it had went to others since", function()
    local f = function(x) return x * 7 end
    assert.equal(14, rc[2]:apply_sync(f, 2))
    -- More distinct functions than a sender has slots: f's slot is given to another.
    for k = 1, 70 do
      local g = load("return function(x) return x + " .. k .. " end")()
      assert.equal(k + 1, rc[2]:apply_sync(g, 1))
    end
    assert.equal(21, rc[2]:apply_sync(f, 3))
    assert.equal(70, rc[2]:apply_sync(load("return function(x) return x + 69 end")(), 1))
  end)

  it("gives each engine its id and the cluster size", function()
    assert.same({ 0, 1, 2, 3 }, dview:apply_sync(function() return lpar.engine.id end))
    assert.same({ 4, 4, 4, 4 }, dview:apply_sync(function() return lpar.engine.n end))
  end)

  it("runs engines with one OpenBLAS thread unless asked", function()
    local v = rc[0]:apply_sync(function() return os.getenv("OPENBLAS_NUM_THREADS") end)
    assert.equal("1", v)
  end)

  describe("views", function()
    it("address engines by id, list and slice", function()
      local who = function() return lpar.engine.id end
      assert.equal(2, rc[2]:apply_sync(who))
      assert.same({ 0, 1 }, rc:view("0:2"):apply_sync(who))
      assert.same({ 2, 3 }, rc:view("2:4"):apply_sync(who))
      assert.same({ 0, 2 }, rc:view("::2"):apply_sync(who))
      assert.same({ 1, 2, 3 }, rc:view("1:"):apply_sync(who))
      assert.same({ 3 }, rc:view("-1"):apply_sync(who))
      assert.same({ 0, 2 }, rc:view("0,2"):apply_sync(who))
      assert.same({ 3, 1 }, rc:view({ 3, 1 }):apply_sync(who))
    end)

    it("report their targets", function()
      assert.equal("all", dview.targets)
      assert.equal(1, rc[1].targets)
      assert.same({ 0, 1 }, rc:view("0:2").targets)
    end)

    it("wait for every result they handed out, their copies' too, and for no other view's", function()
      local v, other = rc[1], rc[2]
      local spin = function(s) local t = os.clock() while os.clock() - t < s do end return s end
      local busy = other:apply_async(spin, 3) -- another view's: v:wait does not wait for it
      local ars = {}
      local copy = v:with { block = false }
      for i = 1, 300 do ars[i] = (i % 2 == 0 and copy or v):apply_async(function(x) return x end, i) end
      local last = v:apply_async(spin, 0.2)
      assert.is_false(v:wait(0))
      assert.is_true(v:wait(10))
      assert.is_true(last:ready())
      for i = 1, 300 do assert.equal(i, ars[i]:get(0)) end
      assert.is_false(busy:ready())
      rc:interrupt(2)
      assert.is_true(busy:wait(10))
    end)

    it("refuse targets that do not exist, at the call site", function()
      assert.has_error(function() rc:view(9) end, "no engine 9 (engines: 0 1 2 3)")
    end)

    it("are non-blocking by default and blocking when asked", function()
      local v = rc[0]
      assert.is_false(v.block)
      local ar = v:apply(function() return 5 end)
      assert.equal(5, ar:get())
      v.block = true
      assert.equal(6, v:apply(function() return 6 end))
      assert.equal(7, rc[0]:with { block = true }:apply(function() return 7 end))
      assert.has_error(function() rc[0]:with { blok = true } end,
        "with: unknown view flag 'blok' (did you mean 'block'?)")
    end)
  end)

  describe("execute", function()
    it("runs code in the engines' globals", function()
      dview:execute("x = lpar.engine.id * 10", { block = true })
      assert.same({ 0, 10, 20, 30 }, dview:pull("x", { block = true }))
    end)

    it("returns an AsyncResult, waited for when blocking", function()
      local ar = dview:execute("y = 1", { block = true })
      assert.is_true(ar:ready())
      assert.is_true(ar:successful())
      local ar2 = dview:execute("y = 2")
      assert.is_true(ar2:wait(5))
    end)

    it("captures print and io.write per engine", function()
      local ar = rc:view("0:2"):execute([[print("hi", lpar.engine.id); io.write("a", 1, "\n")]],
        { block = true })
      assert.same({ "hi\t0\na1\n", "hi\t1\na1\n" }, ar.stdout)
      local one = rc[3]:execute("io.stderr:write('oops')", { block = true })
      assert.equal("oops", one.stderr)
      assert.equal("", one.stdout)
    end)

    it("runs a file with run()", function()
      local path = os.tmpname()
      local f = assert(io.open(path, "w"))
      f:write("from_file = 'yes'\n")
      f:close()
      rc[1]:run(path, { block = true })
      os.remove(path)
      assert.equal("yes", rc[1]:pull("from_file"):get())
    end)
  end)

  describe("apply", function()
    it("passes arguments and returns every value on a single engine", function()
      local a, b, c = rc[1]:apply_sync(function(x, y) return x + y, x * y, "s" end, 3, 4)
      assert.same({ 7, 12, "s" }, { a, b, c })
    end)

    it("returns a list in target order on several engines", function()
      local ar = rc:view({ 3, 0 }):apply_async(function(x) return lpar.engine.id + x end, 100)
      assert.same({ 103, 100 }, ar:get())
    end)

    it("sends closures with their upvalues", function()
      local k = 7
      local t = { 1, 2, 3 }
      local f = function() return k * #t end
      assert.same({ 21, 21, 21, 21 }, dview:apply_sync(f))
    end)

    it("keeps integers and floats apart", function()
      local i, f = rc[0]:apply_sync(function(a, b) return a, b end, 3, 3.0)
      assert.equal("integer", math.type(i))
      assert.equal("float", math.type(f))
    end)

    it("names a value that cannot be sent, and sends nothing", function()
      local fh = io.stdout
      local f = function() return fh end
      local ok, err = pcall(rc[0].apply, rc[0], f)
      assert.is_false(ok)
      assert.matches("cannot send args%[1%]%.upvalue 'fh': userdata FILE%*", err)
      assert.equal(0, rc:queue_status()[0].queue)
    end)
  end)

  describe("push and pull", function()
    it("move globals both ways", function()
      dview:push({ a = 1, b = { "x", "y" } }, { block = true })
      assert.same({ 1, 1, 1, 1 }, dview:pull("a", { block = true }))
      local ab = rc[2]:pull({ "a", "b" }):get()
      assert.same({ 1, { "x", "y" } }, ab)
    end)

    it("move binary strings intact", function()
      local s = {}
      for i = 0, 255 do s[#s + 1] = string.char(i) end
      s = table.concat(s):rep(1000)
      rc[1]:push({ blob = s }, { block = true })
      assert.equal(s, rc[1]:pull("blob"):get())
    end)
  end)

  describe("scatter and gather", function()
    it("split a list in order and put it back", function()
      local list = {}
      for i = 1, 10 do list[i] = i * i end
      dview:scatter("part", list, { block = true })
      assert.same({ 3, 3, 2, 2 }, dview:apply_sync(function() return #part end))
      assert.same({ 1, 4, 9 }, rc[0]:pull("part"):get())
      assert.same(list, dview:gather("part", { block = true }))
    end)
  end)

  describe("map", function()
    it("equals the serial map", function()
      local list = {}
      for i = 1, 37 do list[i] = i end
      local sq = function(x) return x * x end
      local want = {}
      for i, x in ipairs(list) do want[i] = sq(x) end
      assert.same(want, dview:map_sync(sq, list))
      assert.same(want, dview:map_async(sq, list):get())
      assert.same(want, dview:map(sq, list, { block = true }))
    end)

    it("handles a list shorter than the engines", function()
      assert.same({ 2 }, dview:map_sync(function(x) return x * 2 end, { 1 }))
      assert.same({}, dview:map_sync(function(x) return x end, {}))
    end)
  end)

  describe("AsyncResult", function()
    it("reports readiness, timing and metadata", function()
      local ar = rc[1]:apply_async(function() local t = os.clock() while os.clock() - t < 0.05 do end end)
      assert.is_false(ar:ready())
      assert.has_error(function() ar:successful() end, "AsyncResult:successful(): the result is not ready")
      assert.is_true(ar:wait())
      assert.is_true(ar:successful())
      assert.is_true(ar.elapsed >= 0.05)
      local md = ar.metadata
      assert.equal(1, md.engine_id)
      assert.is_true(md.submitted <= md.started and md.started <= md.completed)
      assert.is_true(ar:wall_time() >= 0.04)
    end)

    it("times out with a TimeoutError and stays usable", function()
      local ar = rc[2]:apply_async(function() local t = os.clock() while os.clock() - t < 0.3 do end return "late" end)
      local ok, err = pcall(ar.get, ar, 0.01)
      assert.is_false(ok)
      assert.equal(lpar.TimeoutError, getmetatable(err))
      assert.matches("not ready after 0.01s", tostring(err))
      assert.is_false(ar:wait(0))
      assert.equal("late", ar:get(5))
    end)

    it("iterates in arrival order", function()
      -- Engine 2 answers at once; engine 1 once this client has seen 2's
      -- answer, engine 0 once it has seen 1's: each waits (at most 5 s) for
      -- the file the loop below writes.
      local dir = os.tmpname()
      local ar = rc:view("0:3"):apply_async(function(base)
        local id = lpar.engine.id
        local function exists(path) local f = io.open(path) if f then f:close() end return f ~= nil end
        local deadline = os.time() + 5
        while id < 2 and not exists(base .. "." .. (id + 1)) and os.time() < deadline do end
        return id
      end, dir)
      local order = {}
      for engine, v in ar:iter() do
        assert.equal(engine, v)
        order[#order + 1] = engine
        io.open(dir .. "." .. engine, "w"):close()
      end
      assert.same({ 2, 1, 0 }, order)
      for id = 0, 2 do os.remove(dir .. "." .. id) end
      os.remove(dir)
    end)

    it("shows outputs labelled by engine", function()
      local ar = rc:view("0:2"):execute("print('line 1') print('line 2')", { block = true })
      local lines = {}
      ar:display_outputs { out = { write = function(_, ...) lines[#lines + 1] = table.concat({ ... }) end } }
      assert.equal("[stdout:0] line 1\n[stdout:0] line 2\n", lines[1])
      assert.equal("[stdout:1] line 1\n[stdout:1] line 2\n", lines[2])
    end)

    it("collects display data from the engines and saves it", function()
      local ar = rc:view("1:3"):execute([[
        lpar.engine.display("text/plain", "note from " .. lpar.engine.id, { kind = "note" })
      ]], { block = true })
      assert.equal(2, #ar.outputs)
      local o = ar.outputs[1]
      assert.equal("text/plain", o.type)
      assert.equal("note", o.metadata.kind)
      local dir = os.tmpname()
      os.remove(dir)
      os.execute("mkdir " .. dir)
      local lines = {}
      local sink = { write = function(_, ...) lines[#lines + 1] = table.concat { ... } end }
      local paths = ar:display_outputs { dir = dir, out = sink }
      assert.equal(2, #paths)
      local f = assert(io.open(paths[1], "rb"))
      assert.matches("^note from [12]$", f:read("a"))
      f:close()
      assert.matches("^%[output:[12]%] " .. dir:gsub("%p", "%%%0") .. "/output%-[12]%-%d+%-[12]%.txt\n$", lines[1])
      os.execute("rm -r " .. dir)
    end)
  end)

  describe("the shared luv loop", function()
    it("keeps the user's luv timers firing while get() waits", function()
      local ticks = 0
      local timer = uv.new_timer()
      timer:start(5, 5, function() ticks = ticks + 1 end)
      rc[0]:apply_sync(function() local t = os.clock() while os.clock() - t < 0.1 do end end)
      helpers.close(timer)
      assert.is_true(ticks >= 5)
    end)

    it("refuses to run the loop again from inside a luv callback", function()
      local ar = rc[0]:apply_async(function() local t = os.clock() while os.clock() - t < 0.05 do end return 1 end)
      local err
      local timer = uv.new_timer()
      timer:start(1, 0, function()
        local ok, e = pcall(ar.get, ar)
        err = not ok and e
        timer:close()
      end)
      ar:wait()
      uv.run("nowait")
      assert.matches("cannot wait for a result inside a luv callback", err)
    end)

    it("lets a coroutine inside a callback wait by yielding", function()
      local ar = rc[3]:apply_async(function() local t = os.clock() while os.clock() - t < 0.05 do end return 42 end)
      local got
      local timer = uv.new_timer()
      timer:start(1, 0, function()
        timer:close()
        coroutine.wrap(function() got = ar:get() end)()
      end)
      assert.is_true(helpers.wait_until(function() return got ~= nil end, 5))
      assert.equal(42, got)
    end)
  end)
end)

describe("sync_imports", function()
  it("binds a module here and on the engines, under a chosen or the last name", function()
    local rc <close> = lpar.Cluster { n = 2 }:start_and_connect()
    local dview = rc:view()
    local lines = {}
    local real = io.stdout
    io.stdout = { write = function(_, ...) lines[#lines + 1] = table.concat { ... } end } -- luacheck: ignore
    local ok, err = pcall(dview.sync_imports, dview, { np = "lpar.matrix", "lpar.timeit" })
    io.stdout = real -- luacheck: ignore
    assert.is_true(ok, err)
    assert.equal(require("lpar.matrix"), rawget(_G, "np"))
    assert.equal(require("lpar.timeit"), rawget(_G, "timeit"))
    assert.same({ true, true }, dview:apply_sync(function() return np.eye(2):sum() == 2 and timeit ~= nil end)) -- luacheck: ignore
    table.sort(lines)
    assert.equal("importing lpar.matrix as np here and on engine(s) 0 1\n", lines[1])
    assert.equal("importing lpar.timeit as timeit here and on engine(s) 0 1\n", lines[2])
    assert.has_error(function() dview:sync_imports { "no.such.module" } end)
    _G.np, _G.timeit = nil, nil
  end)
end)

describe("Cluster options", function()
  it("pass engine_env and blas_threads to the engines", function()
    local rc <close> = lpar.Cluster { n = 1, engine_env = { LPAR_SPEC_VAR = "yes" }, blas_threads = 2 }
      :start_and_connect()
    local var, blas = rc[0]:apply_sync(function()
      return os.getenv("LPAR_SPEC_VAR"), os.getenv("OPENBLAS_NUM_THREADS")
    end)
    assert.equal("yes", var)
    assert.equal("2", blas)
  end)

  it("name a bad engine count and an engine that cannot start", function()
    assert.has_error(function() lpar.Cluster { n = 0 } end, "Cluster: n must be a positive integer")
    local c = lpar.Cluster { n = 1, engine = "/nonexistent/lpar-engine", timeout = 2 }
    local ok, err = pcall(c.start_and_connect, c)
    assert.is_false(ok)
    assert.matches("cannot start engine 0 %(/nonexistent/lpar%-engine%): No such file or directory", tostring(err))
    c:stop()
  end)
end)
