-- The rest of ipyparallel's everyday task API, in Lua's spelling (issue 16,
-- item 5): rc[slice], rc:wait() for everything, result_status, purge_results,
-- resubmit, view:remote, view:parallel, dview.vars, and C functions and
-- lpar's modules travelling by name.
-- Globals of the engines, read by functions that run there:
-- luacheck: globals np vx
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

  describe("C functions and lpar's modules by name", function()
    it("sends a matrix method as a value: rc[0]:apply(A.dot, A, B)", function()
      local A, B = matrix.random(4, 3, 1), matrix.random(3, 2, 2)
      local C = rc[0]:apply_sync(A.dot, A, B)
      assert.equal(0, C:max_abs_diff(A:dot(B)))
      assert.equal(A.dot, matrix.dot) -- the method is the module's function
    end)

    it("loads lpar.matrix on an engine that never required it", function()
      local had, eye = rc[1]:apply_sync(function(m)
        return m == package.loaded["lpar.matrix"], m.eye(2):get(2, 2)
      end, matrix)
      assert.is_true(had)
      assert.equal(1, eye)
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
