-- The prompt's magics, as the prompt and the Jupyter kernel share them
-- (lpar.prompt's Session), driven with scripted input lines and their output
-- captured: the gaps found trying the tutorial at the prompt.
local lpar = require "lpar"
local prompt = require "lpar.prompt"

local rc, session, written, history

--- Run `line` (and, for a %% magic, the cell lines after it) and return
-- what the prompt printed.
local function run(line, cell)
  local queue = cell or {}
  session.rl = {
    readline = function() return table.remove(queue, 1) end,
    add_history = function(l) history[#history + 1] = l end,
  }
  written = {}
  local capture = { write = function(f, ...) written[#written + 1] = table.concat({ ... }) return f end,
                    flush = function(f) return f end }
  local saved = io.stdout
  io.stdout = capture -- luacheck: ignore 122 (px writes to io.stdout)
  local ok, err = pcall(session.handle, session, line)
  io.stdout = saved -- luacheck: ignore 122
  assert(ok, err)
  return table.concat(written)
end

describe("the magics", function()
  lazy_setup(function()
    rc = lpar.Cluster { n = 2 }:start_and_connect()
    session = setmetatable({ rc = rc }, { __index = prompt.Session })
    function session.write(_, ...) io.stdout:write(...) end
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
  end)
  lazy_teardown(function()
    _G.rc, _G.dview = nil, nil
    if rc then rc:close() end
  end)
  before_each(function() history = {} end)

  it("%px takes its options before the code", function()
    local out = run("%px --targets 1 print(1)")
    assert.equal("[stdout:1] 1\n", out)
  end)

  it("%px shows what a return gives, and a last line's value after statements", function()
    assert.matches("Out%[0:%d+%]: 5\nOut%[1:%d+%]: 5\n", run("%px return 5"))
    local out = run("%%px", { "local y = 3", "y * (lpar.engine.id + 1)", "" })
    assert.matches("Out%[0:%d+%]: 3\nOut%[1:%d+%]: 6\n", out)
  end)

  it("names an unknown %%px option, and a missing value, without running the cell here", function()
    _G.ran_here = nil
    assert.equal("%%px: unknown option '--foo'\n", run("%%px --foo", { "ran_here = true", "" }))
    assert.is_nil(_G.ran_here)
    assert.matches("%-%-targets needs a value", run("%%px --targets", { "ran_here = true", "" }))
    assert.is_nil(_G.ran_here)
    run("'next'") -- the prompt goes on with the next line, not the dropped cell's
    assert.is_nil(_G.ran_here)
  end)

  it("%pxresult shows a non-blocking cell's values as well as its output", function()
    run("%%px --noblock", { "print('out ' .. lpar.engine.id)", "lpar.engine.id + 10", "" })
    local out = run("%pxresult")
    assert.matches("%[stdout:0%] out 0", out)
    assert.matches("Out%[0%]: 10\nOut%[1%]: 11\n", out)
  end)

  describe("%pxconfig", function()
    after_each(function() run("%pxconfig --targets all --block --no-verbose") end)

    it("sets the targets and blocking of %px and %%px, as ipyparallel's", function()
      assert.equal("", run("%pxconfig --targets 1"))
      assert.equal("[stdout:1] one\n", run("%px print('one')"))
      assert.equal("[stdout:1] cell\n", run("%%px", { "print('cell')", "" }))
      assert.equal("[stdout:0] zero\n", run("%px --targets 0 print('zero')")) -- a cell's own option wins
      run("%pxconfig --noblock")
      local out = run("%px print('later')")
      assert.matches("^<AsyncResult: execute on 1 engines; %%pxresult shows it>", out)
      assert.matches("%[stdout:1%] later", run("%pxresult"))
    end)

    it("--verbose says where each %px runs", function()
      run("%pxconfig --verbose --targets 0,1")
      local out = run("%px print('v')") -- the engines' lines in arrival order
      assert.matches("^Parallel execution on engine%(s%): 0,1\n", out)
      assert.matches("%[stdout:0%] v\n", out)
      assert.matches("%[stdout:1%] v\n", out)
      run("%pxconfig --noblock")
      assert.matches("^Async parallel execution on engine%(s%): 0,1\n", run("%px x = 2"))
      run("%pxconfig --targets all --block")
      assert.matches("^Parallel execution on engine%(s%): all\n", run("%px x = 1"))
    end)

    it("shows the defaults with no options, and refuses bad ones changing nothing", function()
      assert.equal("%px defaults: targets all, --block, --no-verbose\n", run("%pxconfig"))
      assert.equal("%pxconfig: no engine 7 (engines: 0 1)\n", run("%pxconfig --noblock --targets 7"))
      assert.equal("%pxconfig: unknown option '--local' (--targets T, --block, --noblock, --verbose, "
        .. "--no-verbose)\n", run("%pxconfig --local"))
      assert.equal("%px defaults: targets all, --block, --no-verbose\n", run("%pxconfig"))
    end)
  end)

  it("%lsmagic lists %%timeit too", function()
    assert.matches(" %%%%timeit ", run("%lsmagic"))
  end)

  it("shows the same error from every engine once, naming them all", function()
    local out = run("%px error('same')")
    assert.matches("^%[0,1:execute%] %[execute%]:1: same\n", out)
    local _, count = out:gsub("stack traceback", "")
    assert.equal(1, count)
  end)

  it("cuts a local error's traceback at the user's chunk", function()
    local out = run("error('boom')")
    assert.matches("boom", out)
    assert.falsy(out:find("prompt.lua", 1, true), out)
  end)

  it("keeps a whole %%px cell in the history", function()
    run("%%px", { "x1 = 1", "x2 = 2", "" })
    assert.same({ "x1 = 1", "x2 = 2" }, history)
  end)

  it("completes a Client's and a view's methods, without internals", function()
    local c = prompt.completer
    assert.truthy(#c("rc:vi") > 0)
    assert.same({ "rc:view" }, c("rc:vie"))
    assert.truthy(#c("rc.") > 0)
    local dv = c("dview:")
    assert.truthy(#dv > 5)
    for _, m in ipairs(dv) do assert.falsy(m:match("^dview:_"), m) end
    assert.same({}, c("rc:view():"))
    assert.same({ "math.floor" }, c("math.flo"))
  end)
end)
