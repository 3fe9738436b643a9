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

describe("the lpar command line", function()
  local function run(args)
    local err = os.tmpname()
    local out, code = helpers.run(helpers.lpar .. " " .. args .. " 2>" .. err)
    local f = assert(io.open(err))
    local stderr = f:read("a")
    f:close()
    os.remove(err)
    return out, code, stderr
  end

  it("prints its version with --version and -v", function()
    for _, flag in ipairs { "--version", "-v" } do
      local out, code = run(flag)
      assert.equal(0, code)
      assert.equal("lpar 0.1.0 (Lua 5.4)\n", out)
    end
  end)

  it("prints help on stdout and exits 0 for every command and subcommand", function()
    for _, cmd in ipairs { "", "cluster ", "cluster start ", "cluster stop ", "cluster list ", "cluster clean ",
                           "engine " } do
      for _, flag in ipairs { "--help", "-h" } do
        local out, code, stderr = run(cmd .. flag)
        assert.equal(0, code, cmd .. flag)
        assert.equal("", stderr, cmd .. flag)
        assert.matches("^Usage: lpar " .. cmd:gsub("%s+$", ""), out)
      end
    end
  end)

  it("names an unknown option and exits 2", function()
    local out, code, stderr = run("--frobnicate")
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("unknown option '%-%-frobnicate'", stderr)
    code, stderr = select(2, run("cluster stop --profil x"))
    assert.equal(2, code)
    assert.matches("unknown option '%-%-profil'", stderr)
    code, stderr = select(2, run("-n lots -e 'print(1)'"))
    assert.equal(2, code)
    assert.matches("%-n needs a number of engines from 1 to 4096", stderr)
  end)

  it("runs -e and -l in order, before the script, whose arguments are its own", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "w"))
    f:write('print("script", arg[0] == ..., select("#", ...), arg[1], arg[2], arg[-1])\n')
    f:close()
    local out, code = run("-e 'print(\"first\")' -l lpar.matrix -e 'print(type(matrix.eye))' " .. path ..
      " -e --")
    assert.equal(0, code)
    assert.equal("first\nfunction\nscript\tfalse\t2\t-e\t--\tprint(type(matrix.eye))\n", out)
    os.remove(path)
  end)

  it("runs standard input with -, and a script named after --", function()
    local out, code = helpers.run("echo 'print(\"stdin\", ...)' | " .. helpers.lpar .. " - a b")
    assert.equal(0, code)
    assert.equal("stdin\ta\tb\n", out)
    out, code = helpers.run(helpers.lpar .. " -- /nonexistent.lua 2>&1")
    assert.equal(1, code)
    assert.matches("cannot open /nonexistent.lua", out)
  end)

  it("gives a script rc and dview on N engines with -n, options in any order", function()
    local out, code = run("-e 'x = 1' -n 2 -e 'print(#rc, dview.block, x)'")
    assert.equal(0, code)
    assert.equal("2\ttrue\t1\n", out)
  end)
end)

describe("the prompt's tab completion", function()
  it("completes the methods of a Client and of an AsyncResult", function()
    local completer = require("lpar.prompt").completer
    local lpar = require "lpar"
    local cluster = lpar.Cluster { n = 1 }
    local rc = cluster:start_and_connect()
    _G.rc_for_completion, _G.ar_for_completion = rc, rc[0]:apply_async(function() end)
    assert.same({ "rc_for_completion:view" }, completer("rc_for_completion:vi"))
    assert.same({ "rc_for_completion:load_balanced_view" }, completer("rc_for_completion:load"))
    assert.same({ "ar_for_completion:wait", "ar_for_completion:wait_interactive" }, completer("ar_for_completion:wai"))
    _G.ar_for_completion:wait(5)
    _G.rc_for_completion, _G.ar_for_completion = nil, nil
    rc:close()
    cluster:stop()
  end)
end)

describe("the prompt's %lsmagic", function()
  it("lists every magic, %%timeit included", function()
    local out, code = helpers.run("printf '%%lsmagic\\n' | " .. helpers.lpar .. " 2>&1")
    assert.equal(0, code, out)
    local listed = out:match("Available magics: ([^\n]*)")
    assert.is_truthy(listed, out)
    for _, m in ipairs { "%%px", "%%timeit", "%autopx", "%help", "%lsmagic", "%px", "%pxresult", "%timeit" } do
      assert.is_truthy(listed:find(m .. " ", 1, true) or listed:sub(-#m) == m, m .. " in: " .. listed)
    end
  end)
end)
