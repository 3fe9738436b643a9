-- The prompt, driven as a person would: tmux runs `lpar -n 4` in a terminal,
-- send-keys types, capture-pane reads the screen.
local helpers = require "helpers"

local session = "lpar-spec-" .. math.random(1e9)
local dir
-- A tmux server of its own (-L): the default one is shared with whatever
-- else runs tmux on this machine. A session kept in it for the whole spec
-- keeps it up while the prompt's session is stopped and started again (a
-- server whose last session ends exits, racing the next new-session).
local TMUX = "tmux -L " .. session .. " "

local function tmux(args)
  local out, code = helpers.run(TMUX .. args .. " 2>&1")
  return out, code
end

local function screen()
  return (tmux("capture-pane -p -J -S -200 -t " .. session))
end

--- Wait until the screen matches `pattern` (a Lua pattern), up to `timeout` s.
local function wait_for(pattern, timeout)
  local deadline = os.time() + (timeout or 5)
  repeat
    local s = screen()
    if s:find(pattern) then return s end
    os.execute("sleep 0.05")
  until os.time() > deadline
  error("screen never showed " .. pattern .. ":\n" .. screen(), 2)
end

local function keys(...)
  for _, k in ipairs { ... } do
    if k == "Enter" or k == "C-c" or k == "C-d" or k == "Up" or k == "C-u" then
      tmux("send-keys -t " .. session .. " " .. k)
    else
      tmux("send-keys -t " .. session .. " -l '" .. k:gsub("'", "'\\''") .. "'")
    end
  end
end

local function type_line(line) keys(line, "Enter") end

local function start(args)
  tmux(string.format("new-session -d -s %s -x 150 -y 50 'LPAR_DIR=%s %s %s; sleep 60'",
    session, dir, helpers.lpar, args))
end

local function stop() tmux("kill-session -t " .. session) end

describe("the prompt", function()
  lazy_setup(function()
    dir = os.tmpname()
    os.remove(dir)
    tmux("new-session -d -s keep 'sleep 600'")
    start("-n 4")
    wait_for("4 engines; rc is the Client")
  end)
  lazy_teardown(function()
    stop()
    tmux("kill-server")
    os.execute("rm -rf " .. dir)
    -- The private server's socket outlives it.
    local uid = helpers.run("id -u"):match("%d+")
    os.remove((os.getenv("TMUX_TMPDIR") or "/tmp") .. "/tmux-" .. uid .. "/" .. session)
  end)

  it("says once, in its banner, which BLAS and kernel run and why", function()
    local s = wait_for("BLAS: OpenBLAS [%d.]+, kernel %a+, %d+ threads? here\n +%S")
    assert.truthy(s:find("OPENBLAS_CORETYPE", 1, true) or s:find("LPAR_BLAS_CORETYPE", 1, true), s)
    local _, count = s:gsub("BLAS: ", "")
    assert.equal(1, count)
  end)

  it("runs %px on every engine and labels the output", function()
    type_line("%px a = lpar.engine.id * 10")
    type_line("%px print(a)")
    local s = wait_for("%[stdout:3%] 30")
    for id = 0, 3 do assert.truthy(s:find("%[stdout:" .. id .. "%] " .. id * 10)) end
    type_line("%px lpar.engine.id + 100")
    wait_for("Out%[3:%d+%]: 103")
  end)

  it("runs %%px --targets 0::2 --local on engines 0 and 2 and here", function()
    type_line("here = 'client'")
    type_line("%%px --targets 0::2 --local")
    type_line("print(lpar.engine and ('engine ' .. lpar.engine.id) or here)")
    type_line("")
    local s = wait_for("\nclient\n")
    assert.truthy(s:find("%[stdout:0%] engine 0"))
    assert.truthy(s:find("%[stdout:2%] engine 2"))
    assert.falsy(s:find("%[stdout:1%] engine 1"))
  end)

  it("switches %autopx on and off", function()
    type_line("%autopx")
    wait_for("%%autopx enabled")
    type_line("print('auto ' .. lpar.engine.id)")
    wait_for("%[stdout:3%] auto 3")
    type_line("%autopx")
    wait_for("%%autopx disabled")
    type_line("print('back ' .. 'here')")
    wait_for("\nback here\n")
  end)

  it("prints expression values, and %timeit's line", function()
    type_line("dview:pull('a')")
    wait_for("{0, 10, 20, 30}")
    type_line("%timeit -n 100 -r 3 local x = 1")
    wait_for("100 loops, best of 3: [%d.]+ %S+ per loop")
  end)

  it("shows an engine's error with its traceback", function()
    type_line("%px if lpar.engine.id == 2 then error('boom') end")
    local s = wait_for("%[2:execute%] %[execute%]:1: boom")
    assert.truthy(s:find("stack traceback:", 1, true))
  end)

  it("interrupts a runaway %px with Ctrl-C, keeps the engines' state, and goes on", function()
    type_line("%px while true do end")
    os.execute("sleep 0.3")
    local hrtime = require("luv").hrtime
    local t0 = hrtime()
    keys("C-c")
    wait_for("interrupted", 2)
    assert.is_true((hrtime() - t0) / 1e9 < 1, "the prompt took over a second to come back")
    type_line("%px print('alive', a)")
    wait_for("%[stdout:1%] alive%s+10")
  end)

  it("interrupts a blocking call typed as plain Lua with Ctrl-C, twice in a row", function()
    for round = 1, 2 do
      type_line("os.execute('clear')")
      type_line('dview:execute("while true do end")')
      os.execute("sleep 0.3")
      keys("C-c")
      wait_for("%[[%d,]+:execute%] interrupted", 3) -- engines with the same error are shown once
      type_line(string.format("%%px print('alive%d', a)", round))
      wait_for("%[stdout:1%] alive" .. round .. "%s+10")
    end
  end)

  it("clears the line on Ctrl-C at an idle prompt", function()
    wait_for("lpar> %s*$") -- idle: the last cell's output is all out
    keys("half typed", "C-c")
    type_line("'still here'")
    wait_for('"still here"')
  end)

  it("keeps history across a restart, and Ctrl-D stops the engines", function()
    type_line("remember_me = 1")
    wait_for("lpar> remember_me = 1\nlpar> ")
    local shell = helpers.run(TMUX .. "list-panes -t " .. session .. " -F '#{pane_pid}'"):match("%d+")
    keys("C-d")
    -- Signs, not a fixed sleep: the line is in the history file, and the
    -- prompt has ended (a sanitized one takes a while to stop its engines),
    -- so that nothing writes the file while the next prompt reads it.
    assert.is_true(helpers.poll(function()
      return (helpers.read_file(dir .. "/history") or ""):find("remember_me", 1, true) ~= nil end, 10))
    assert.is_true(helpers.poll(function() return helpers.run("pgrep -P " .. shell .. " lpar") == "" end, 20),
      "the prompt did not end on Ctrl-D")
    stop()
    start("")
    wait_for("lpar> %s*$") -- the prompt itself, not just the banner: keys sent before it may be dropped
    keys("Up")
    wait_for("lpar> remember_me = 1")
    keys("C-u")
  end)

  it("keeps the history of a prompt that was killed", function()
    type_line("killed_but_kept = 2")
    wait_for("lpar> killed_but_kept = 2\nlpar> ")
    -- SIGKILL the prompt (the pane's shell runs it): no clean exit.
    local shell = helpers.run(TMUX .. "list-panes -t " .. session .. " -F '#{pane_pid}'"):match("%d+")
    local pid = helpers.run("pgrep -P " .. shell):match("%d+")
    os.execute("kill -KILL " .. pid)
    assert.is_true(helpers.poll(function() return not helpers.alive(tonumber(pid)) end, 5))
    stop()
    start("")
    wait_for("lpar %d.-\nlpar> ") -- line editing is up: keys are not lost
    os.execute("sleep 0.2")
    keys("Up")
    wait_for("lpar> killed_but_kept = 2")
    keys("C-u")
  end)
end)
