local helpers = require "helpers"

describe("the lpar command", function()
  it("runs a script with its arguments and lpar on the path", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write([[
      local lpar = require "lpar"
      local rc <close> = lpar.Cluster { n = 2 }:start_and_connect()
      print(arg[1], arg[2], #rc, rc[1]:apply_sync(function() return lpar.engine.id end))
    ]])
    f:close()
    local out, code = helpers.run(helpers.lpar .. " " .. path .. " a b")
    os.remove(path)
    assert.equal(0, code)
    assert.equal("a\tb\t2\t1\n", out)
  end)

  it("runs a chunk with -e", function()
    local out, code = helpers.run(helpers.lpar .. [[ -e 'print(_VERSION, type(require("lpar").Cluster))']])
    assert.equal(0, code)
    assert.equal("Lua 5.4\tfunction\n", out)
  end)

  it("reports an uncaught error object readably and exits 1", function()
    local out, code = helpers.run(helpers.lpar .. [[ -e '
      local lpar = require "lpar"
      local rc <close> = lpar.Cluster { n = 1 }:start_and_connect()
      rc[0]:apply_sync(function() error("boom") end)' 2>&1]])
    assert.equal(1, code)
    assert.matches("lpar: %[0:apply%] %(command line%):4: boom", out)
  end)

  it("puts engines in their own process group, away from the terminal's Ctrl-C", function()
    local lpar = require "lpar"
    local rc <close> = lpar.Cluster { n = 1 }:start_and_connect()
    local pid = rc:queue_status()[0].pid
    local function pgrp(p)
      local f = assert(io.open("/proc/" .. p .. "/stat"))
      local stat = f:read("a")
      f:close()
      return tonumber(stat:match("^%d+ %b() %a %d+ (%d+)"))
    end
    assert.equal(pid, pgrp(pid))
    assert.are_not.equal(pgrp("self"), pgrp(pid))
  end)
end)
