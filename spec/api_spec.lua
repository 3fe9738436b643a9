-- The rest of ipyparallel's everyday task API, in Lua's spelling (issue 16,
-- item 5): rc[slice], rc:wait() for everything, result_status, purge_results,
-- resubmit, view:remote, view:parallel, dview.vars, and C functions and
-- lpar's modules travelling by name.
-- Globals of the engines, read by functions that run there:
-- luacheck: globals np vx runs count
local lpar = require "lpar"
local matrix = require "lpar.matrix"

describe("the task API", function()
  local rc

  lazy_setup(function()
    rc = lpar.Cluster { n = 2 }:start_and_connect()
  end)

  lazy_teardown(function()
    if rc then rc:close() end
  end)

  local function who() return lpar.engine.id end

  describe("rc[...]", function()
    it("takes a slice string or a list of ids as rc:view does", function()
      assert.same({ 0, 1 }, rc["0:2"]:apply_sync(who))
      assert.same({ 1, 0 }, rc[{ 1, 0 }]:apply_sync(who))
      assert.same({ 1 }, rc["-1"]:apply_sync(who))
      assert.same({ 0, 1 }, rc["0,1"].targets)
      assert.equal(0, rc[0]:apply_sync(who))
    end)

    it("names engines that do not exist, and still finds the methods", function()
      assert.has_error(function() return rc[{ 0, 5 }] end, "no engine 5 (engines: 0 1)")
      assert.equal("function", type(rc.view))
      assert.is_nil(rc.no_such_method)
    end)
  end)

  describe("rc:wait()", function()
    it("waits for every result not done yet when given none", function()
      local lb = rc:load_balanced_view()
      local a = rc[0]:apply_async(function() local t = os.clock() while os.clock() - t < 0.2 do end return 1 end)
      local b = lb:apply_async(function() local t = os.clock() while os.clock() - t < 0.3 do end return 2 end)
      local c = rc:view():execute("vx = 3")
      assert.same({ true }, { rc:wait(nil, 10) }) -- one value, as the prompt shows it
      assert.is_true(a:ready() and b:ready() and c:ready())
      assert.equal(2, b:get())
    end)

    it("is bounded by its timeout", function()
      local slow = rc[1]:apply_async(function() local t = os.clock() while os.clock() - t < 1 do end end)
      local now = require("lpar.core").now
      local t0 = now()
      assert.is_false(rc:wait(nil, 0.1))
      assert.is_true(now() - t0 < 0.9) -- back well before the task ends
      assert.is_true(rc:wait(nil, 10))
      assert.is_true(slow:ready())
    end)

    it("says where the timeout goes when given a number", function()
      assert.has_error(function() rc:wait(5) end,
        "Client:wait: expected a result, a list of results or nil (every result), got number; "
          .. "the timeout comes second: rc:wait(nil, 5)")
    end)
  end)

  describe("result_status, purge_results, resubmit", function()
    local function spin(s) local t = os.clock() while os.clock() - t < s do end return s end

    it("result_status splits results into pending and completed, in the order given", function()
      local done = rc[0]:apply_async(function() return "done" end)
      done:wait(5)
      local busy = rc[1]:apply_async(spin, 0.5)
      local st = rc:result_status({ busy, done })
      assert.same({ busy }, st.pending)
      assert.same({ done }, st.completed)
      assert.is_nil(st.results)
      busy:wait(5)
      st = rc:result_status({ busy, done }, { status_only = false })
      assert.same({ busy, done }, st.completed)
      assert.equal("done", st.results[done])
      assert.equal(0.5, st.results[busy])
      assert.same({ done }, rc:result_status(done).completed)
    end)

    it("result_status names what is not one of this client's results", function()
      assert.has_error(function() rc:result_status({ {} }) end,
        "result_status: element 1 is table, not an AsyncResult")
      assert.has_error(function() rc:result_status("x") end,
        "result_status: expected a result or a list of results, got string")
    end)

    it("purge_results lets go of a result's values; a pending one is refused and nothing purged", function()
      local a = rc[0]:apply_async(function() return ("x"):rep(1000) end)
      a:wait(5)
      local busy = rc[1]:apply_async(spin, 0.3)
      assert.has_error(function() rc:purge_results({ a, busy }) end,
        "purge_results: result 2 is still pending: wait for it or abort it first")
      assert.equal(1000, #a:get()) -- not purged: the call purged nothing
      assert.equal(1, rc:purge_results(a))
      assert.has_error(function() a:get() end, "AsyncResult:get(): the result was purged (rc:purge_results)")
      assert.has_error(function() rc:result_status(a) end,
        "result_status: result 1 was purged (rc:purge_results)")
      busy:wait(5)
    end)

    it('purge_results("all") purges every completed result and keeps the pending ones', function()
      local a = rc[0]:apply_async(function() return 1 end)
      local m = rc:load_balanced_view():map_async(function(x) return x end, { 1, 2, 3 })
      assert.is_true(rc:wait({ a, m }, 5))
      local busy = rc[1]:apply_async(spin, 0.3)
      assert.is_true(rc:purge_results("all") >= 2)
      assert.has_error(function() m:get() end, "AsyncResult:get(): the result was purged (rc:purge_results)")
      assert.has_error(function() m:iter() end, "AsyncResult:iter(): the result was purged (rc:purge_results)")
      assert.has_error(function() a:get() end, "AsyncResult:get(): the result was purged (rc:purge_results)")
      assert.equal(0.3, busy:get(5))
      assert.same({ busy }, rc:result_status(busy).completed)
    end)

    it("resubmit runs a finished call again, direct on the same engines and load-balanced", function()
      rc:view():execute("runs = (runs or 0) + 1", { block = true })
      local direct = rc[1]:apply_async(function() runs = runs + 1 return lpar.engine.id, runs end)
      direct:wait(5)
      local again = rc:resubmit(direct)
      assert.are_not.equal(direct, again)
      local id, runs = again:get(5)
      assert.equal(1, id)
      assert.equal(3, runs)
      local lb = rc:load_balanced_view()
      local m = lb:map_async(function(x) return x * 2 end, { 1, 2, 3 })
      local f = lb:apply_async(function() error("flaky") end)
      rc:wait({ m, f }, 5)
      local new = rc:resubmit({ m, f })
      assert.same({ 2, 4, 6 }, new[1]:get(5))
      assert.has_error(function() new[2]:get(5) end)
      assert.matches("flaky", tostring(select(2, pcall(new[2].get, new[2], 5))))
    end)

    it("resubmit refuses a pending result, and then resubmits nothing", function()
      rc[0]:execute("count = 0", { block = true })
      local done = rc[0]:apply_async(function() count = count + 1 end)
      done:wait(5)
      local busy = rc[1]:apply_async(spin, 0.3)
      assert.has_error(function() rc:resubmit({ done, busy }) end,
        "resubmit: result 2 is still pending: in-flight tasks may not be resubmitted")
      busy:wait(5)
      assert.equal(1, rc[0]:pull("count", { block = true }))
    end)
  end)

  describe("dview.vars", function()
    it("pushes with vars.x = v and pulls with vars.x, as ipyparallel's view['x']", function()
      local dview = rc:view()
      dview.vars.vx = { 1, 2 }
      assert.same({ { 1, 2 }, { 1, 2 } }, dview.vars.vx)
      assert.same({ 1, 2 }, rc[1].vars.vx)
      rc[0].vars.vx = "zero"
      assert.same({ "zero", { 1, 2 } }, dview.vars.vx)
    end)

    it("raises a NameError for a name not defined, as pull does; nil removes a name", function()
      rc[0].vars.vx = 1
      rc[0].vars.vx = nil
      assert.has_error(function() return rc[0].vars.vx end)
      local _, err = pcall(function() return rc[0].vars.vx end)
      assert.matches("NameError: name 'vx' is not defined", tostring(err))
      assert.has_error(function() return rc[0].vars[1] end, "vars: names must be strings, got number")
    end)
  end)

  describe("view:remote(f)", function()
    it("is a callable that applies f on the view's engines, with its flags", function()
      local add = rc:view():remote(function(x) return x + lpar.engine.id end)
      local ar = add(10)
      assert.same({ 10, 11 }, ar:get(5))
      assert.same({ 20, 21 }, rc:view():remote(function(x) return x + lpar.engine.id end, { block = true })(20))
      local lb = rc:load_balanced_view():remote(function(x) return x * 2 end, { block = true })
      assert.equal(42, lb(21))
    end)

    it("refuses what is not a function and flags the view does not have", function()
      assert.has_error(function() rc:view():remote(42) end, "remote: expected a function, got number")
      assert.has_error(function() rc:view():remote(print, { blok = true }) end,
        "remote: unknown view flag 'blok' (did you mean 'block'?)")
    end)
  end)

  describe("view:parallel(f)", function()
    local function offset(part) -- a part of the list, tagged by the engine it ran on
      local out = {}
      for i, v in ipairs(part) do out[i] = v + 100 * lpar.engine.id end
      return out
    end

    it("pf:map(list) calls f on each element, spread over the engines, in order", function()
      local pf = rc:view():parallel(function(x) return x * 10 end, { block = true })
      assert.same({ 10, 20, 30, 40, 50 }, pf:map({ 1, 2, 3, 4, 5 }))
      local lb = rc:load_balanced_view():parallel(function(a, b) return a + b end)
      assert.same({ 11, 22, 33 }, lb:map({ 1, 2, 3 }, { 10, 20, 30 }):get(5))
    end)

    it("pf(list) gives each engine one contiguous part and joins the lists it returns", function()
      local pf = rc:view():parallel(offset, { block = true })
      assert.same({ 1, 2, 3, 104, 105 }, pf({ 1, 2, 3, 4, 5 }))
      assert.same({ 7 }, pf({ 7 })) -- fewer items than engines: no empty part
      assert.same({}, pf({}))
    end)

    it("pf(list) on a load-balanced view makes a task per chunksize items", function()
      local sizes = rc:load_balanced_view():parallel(function(a, b)
        local out = {}
        for i = 1, #a do out[i] = a[i] * b[i] .. "/" .. #a end
        return out
      end, { chunksize = 2, block = true })
      assert.same({ "2/2", "4/2", "6/2", "8/2", "10/1" }, sizes({ 1, 2, 3, 4, 5 }, { 2, 2, 2, 2, 2 }))
    end)

    it("says what is wrong: lists of different lengths, a part that is not a list", function()
      local pf = rc:view():parallel(function(x) return #x end)
      assert.has_error(function() pf({ 1, 2 }, { 1 }) end,
        "parallel: the lists have different lengths (2 and 1)")
      local _, err = pcall(function() return pf({ 1, 2 }):get(5) end)
      assert.matches("parallel: the function returned number for its part of the list, not a list",
        tostring(err))
      assert.has_error(function() rc:view():parallel(print, { chunksize = 2 }) end,
        "parallel: chunksize is for load-balanced views (a DirectView splits the list in one part per engine)")
    end)
  end)

  it("iterates over a DirectView map's elements in order", function()
    local ar = rc:view():map(function(x) return x * x end, { 1, 2, 3, 4, 5 })
    local seen = {}
    for v in ar:iter() do seen[#seen + 1] = v end
    assert.same({ 1, 4, 9, 16, 25 }, seen)
    local failed = rc:view():map(function(x) if x > 2 then error("big") end return x end, { 1, 2, 3, 4 })
    local got = failed:get { timeout = 5, return_errors = true }
    assert.same({ 1, 2 }, { got[1], got[2] })
    assert.matches("big", tostring(got[3]))
    assert.equal(got[3], got[4]) -- the chunk's one error, for each of its elements
  end)

  describe("C functions and lpar's modules by name", function()
    it("sends a matrix method as a value: rc[0]:apply(A.dot, A, B)", function()
      local A, B = matrix.random(4, 3, 1), matrix.random(3, 2, 2)
      local C = rc[0]:apply_sync(A.dot, A, B)
      assert.equal(0, C:max_abs_diff(A:dot(B)))
      assert.equal(A.dot, matrix.dot) -- the method is the module's function
    end)

    it("loads lpar.matrix and lpar.plot on an engine that never required them", function()
      local had, eye = rc[1]:apply_sync(function(m)
        return m == package.loaded["lpar.matrix"], m.eye(2):get(2, 2)
      end, matrix)
      assert.is_true(had)
      assert.equal(1, eye)
      local plot_loaded = rc[1]:apply_sync(function(p) return p == package.loaded["lpar.plot"] end,
        require "lpar.plot")
      assert.is_true(plot_loaded)
    end)

    it("decodes a reply naming lpar.matrix where it is not loaded", function()
      rc:view():execute("np = require 'lpar.matrix'", { block = true })
      local saved = package.loaded["lpar.matrix"]
      package.loaded["lpar.matrix"] = nil
      local ok, m = pcall(function() return rc[0]:apply_sync(function() return np end) end)
      package.loaded["lpar.matrix"] = saved
      assert(ok, tostring(m))
      assert.equal("function", type(m.eye))
    end)

    it("never requires a module that is not lpar's own for a reply", function()
      local ran = false
      package.preload["api_spec_mod"] = function() ran = true return {} end
      local ok, err = pcall(function()
        return rc[0]:apply_sync(function()
          package.loaded["api_spec_mod"] = {}
          return package.loaded["api_spec_mod"]
        end)
      end)
      package.preload["api_spec_mod"] = nil
      assert.is_false(ok)
      assert.matches("unknown library table 'api_spec_mod'", tostring(err))
      assert.is_false(ran)
    end)
  end)
end)
