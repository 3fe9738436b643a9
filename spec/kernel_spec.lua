-- The Jupyter kernel, driven as a notebook drives it: `lpar kernel install`
-- writes a kernelspec under a temporary prefix, and jupyter_client (Debian's
-- python3, spec/kernel_client.py) starts `lpar kernel -f ...` from it, sends
-- the requests and reports what came back as JSON.
local cjson = require "cjson"
local helpers = require "helpers"

local PYTHON = "/usr/bin/python3" -- Debian's, which has jupyter_client (not a pyenv one)
local prefix

local function sh(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function jupyter_env()
  return "JUPYTER_PATH=" .. sh(prefix .. "/share/jupyter") .. " JUPYTER_DATA_DIR=" .. sh(prefix .. "/data")
    .. " JUPYTER_RUNTIME_DIR=" .. sh(prefix .. "/runtime") .. " PYDEVD_DISABLE_FILE_VALIDATION=1"
end

--- Run the driver; returns its JSON report, or raises with its output.
local function drive(args, timeout)
  local driver = sh(assert(os.getenv("PWD")) .. "/spec/kernel_client.py")
  local out, code = helpers.run(string.format("cd %s && %s timeout %d %s -Xfrozen_modules=off %s %s 2>%s/driver.err",
    sh(prefix), jupyter_env(), timeout, PYTHON, driver, args, sh(prefix)))
  local last = out:match("([^\n]+)\n?$")
  local ok, report = pcall(cjson.decode, last or "")
  if code ~= 0 or not ok then
    local f = io.open(prefix .. "/driver.err")
    local err = f and f:read("a") or ""
    if f then f:close() end
    error(string.format("the driver failed (exit %s):\n%s\n%s", tostring(code), out, err:sub(-3000)), 2)
  end
  return report
end

local function kill_all(pids)
  for _, pid in ipairs(pids or {}) do
    if helpers.alive(pid) then require("luv").kill(pid, "sigkill") end
  end
end

--- Pids of lpar kernels whose connection file is under `dir`.
local function kernels_under(dir)
  local pids = {}
  for pid in (helpers.run("ls /proc")):gmatch("%d+") do
    local f = io.open("/proc/" .. pid .. "/cmdline")
    local cmd = f and f:read("a") or ""
    if f then f:close() end
    if cmd:find("\0kernel\0-f\0" .. dir, 1, true) then pids[#pids + 1] = math.tointeger(tonumber(pid)) end
  end
  return pids
end

local function texts(result, kind)
  local out = {}
  for _, o in ipairs(result.outputs) do
    if o.type == kind then out[#out + 1] = o.content.text or o.content.data["text/plain"] end
  end
  return out
end

describe("lpar kernel", function()
  lazy_setup(function()
    prefix = os.tmpname()
    os.remove(prefix)
    assert(os.execute("mkdir -p " .. sh(prefix)))
    local out, code = helpers.run(helpers.lpar .. " kernel install --prefix " .. sh(prefix))
    assert.equal(0, code, out)
  end)
  lazy_teardown(function()
    os.execute("rm -rf " .. sh(prefix))
  end)

  describe("install", function()
    it("writes a kernelspec that jupyter kernelspec list shows, and uninstall removes it", function()
      local list = helpers.run(jupyter_env() .. " jupyter kernelspec list 2>&1")
      assert.matches("lpar%s+" .. prefix:gsub("%p", "%%%0") .. "/share/jupyter/kernels/lpar", list)
      local f = assert(io.open(prefix .. "/share/jupyter/kernels/lpar/kernel.json"))
      local spec = cjson.decode(f:read("a"))
      f:close()
      assert.equal("Lua 5.4 (lpar)", spec.display_name)
      assert.equal("lua", spec.language)
      assert.matches("^/.*/lpar$", spec.argv[1])
      assert.same({ "kernel", "-f", "{connection_file}" }, { spec.argv[2], spec.argv[3], spec.argv[4] })
      local logo = assert(io.open(prefix .. "/share/jupyter/kernels/lpar/logo-64x64.png", "rb"))
      local png = logo:read("a")
      logo:close()
      assert.equal("\137PNG", png:sub(1, 4))
      local w, h = string.unpack(">I4I4", png, 17)
      assert.same({ 64, 64 }, { w, h })

      local other = prefix .. "/other"
      local _, code = helpers.run(helpers.lpar .. " kernel install --prefix " .. sh(other) .. " --name lpar2")
      assert.equal(0, code)
      local env = "JUPYTER_PATH=" .. sh(other .. "/share/jupyter")
      assert.matches("lpar2", (helpers.run(env .. " jupyter kernelspec list 2>&1")))
      _, code = helpers.run(helpers.lpar .. " kernel uninstall --prefix " .. sh(other) .. " --name lpar2")
      assert.equal(0, code)
      assert.falsy((helpers.run(env .. " jupyter kernelspec list 2>&1")):find("lpar2"))
      -- --user: the user's Jupyter data directory
      local data = "JUPYTER_DATA_DIR=" .. sh(prefix .. "/userdata")
      _, code = helpers.run(data .. " " .. helpers.lpar .. " kernel install --user")
      assert.equal(0, code)
      assert.matches("lpar%s+" .. (prefix .. "/userdata/kernels/lpar"):gsub("%p", "%%%0"),
        (helpers.run(data .. " jupyter kernelspec list 2>&1")))
      _, code = helpers.run(data .. " " .. helpers.lpar .. " kernel uninstall --user")
      assert.equal(0, code)
      assert.falsy((helpers.run(data .. " jupyter kernelspec list 2>&1")):find("userdata", 1, true))
      local msg
      msg, code = helpers.run(helpers.lpar .. " kernel install --user --prefix /x 2>&1")
      assert.equal(2, code) -- a usage error, as every command's
      assert.matches("'%-%-prefix' can not be used together with option '%-%-user'", msg)
    end)
  end)

  describe("over the protocol", function()
    local seen
    lazy_setup(function()
      seen = drive("protocol " .. sh(prefix .. "/kernel.log"), 240)
    end)
    lazy_teardown(function()
      if seen then kill_all(seen.engine_pids) end
    end)

    it("answers kernel_info as a Lua 5.4 kernel of protocol 5.3", function()
      assert.equal("5.3", seen.kernel_info.protocol_version)
      assert.equal("lua", seen.kernel_info.language_info.name)
      assert.equal("lpar", seen.kernel_info.implementation)
    end)

    it("executes cells: values as execute_result, the last line's too, print as a stream", function()
      assert.same({ "2" }, texts(seen.expression, "execute_result"))
      assert.equal(1, seen.expression.reply.execution_count)
      assert.same({ "hi\n" }, texts(seen.last_line, "stream"))
      assert.same({ "6" }, texts(seen.last_line, "execute_result"))
      -- silent: nothing published, and the count does not move
      assert.same({}, seen.silent.outputs)
      assert.equal(seen.last_line.reply.execution_count, seen.silent.reply.execution_count)
      local ue = seen.user_expressions.reply.user_expressions
      assert.equal("14", ue.double.data["text/plain"])
      assert.equal("error", ue.bad.status)
      assert.same({ "bad \u{FFFD} byte\n" }, texts(seen.binary_output, "stream")) -- bytes that are not UTF-8
      assert.equal("error", seen.local_error.reply.status)
      assert.matches("attempt to index a nil value", seen.local_error.reply.evalue)
    end)

    it("streams %px output from 4 engines, labelled by engine", function()
      assert.same({ "4" }, texts(seen.cluster, "execute_result"))
      local got = table.concat(texts(seen.streams, "stream"))
      for id = 0, 3 do assert.matches("%[stdout:" .. id .. "%] engine " .. id .. "\n", got) end
    end)

    it("streams engine output while the cell runs, and gathers many prints into few messages", function()
      local early = seen.streaming.early_before_end
      assert.is_truthy(early, "the engine's early line never came")
      assert.is_true(early > 0.5, "the early line came only " .. early .. " s before the end")
      assert.equal(100000, seen.many_lines.lines)
      assert.equal("100000\n", seen.many_lines.last)
      assert.is_true(seen.many_lines.messages < 200, seen.many_lines.messages .. " stream messages")
    end)

    it("makes an engine's error the cell's error, naming the engine; identical ones grouped", function()
      local r = seen.remote_error.reply
      assert.equal("error", r.status)
      assert.equal("RemoteError", r.ename)
      assert.matches("^%[2:execute%] %[execute%]:1: boom", r.evalue)
      assert.matches("%[2:execute%]", r.traceback[1])
      local g = seen.grouped_error.reply
      assert.equal("CompositeError", g.ename)
      assert.equal("[0,1,2,3:execute] [execute]:1: same everywhere", g.traceback[1])
    end)

    it("shows engines' images inline as display_data with a PNG of the right size", function()
      assert.equal("ok", seen.display.reply.status)
      assert.equal(2, #seen.display.images) -- engines 0 and 2
      for _, img in ipairs(seen.display.images) do
        assert.same({ 96, 64 }, img.size) -- 16x24 drawn at scale 4
        assert.matches("from engine [02]", img.text)
      end
      assert.same({ ["text/html"] = "<b>bold</b>", ["text/plain"] = "bold" }, seen.display_html[1])
    end)

    it("shows a local image inline, and wait_interactive's progress updated in place", function()
      assert.same({ { 8, 8 } }, seen.local_image)
      local p = seen.progress
      assert.is_true(#p >= 1)
      assert.equal("display_data", p[1].type)
      assert.matches("^8/8 tasks done in", p[#p].text)
      for _, o in ipairs(p) do assert.equal(p[1].id, o.id) end
      if #p > 1 then assert.equal("update_display_data", p[#p].type) end
    end)

    it("sends cells to the engines under %autopx, until %autopx again", function()
      local on, auto, off, back = table.unpack(seen.autopx)
      assert.matches("%%autopx enabled", table.concat(texts(on, "stream")))
      local got = table.concat(texts(auto, "stream"))
      for id = 0, 3 do assert.matches("%[stdout:" .. id .. "%] auto " .. id, got) end
      assert.matches("%%autopx disabled", table.concat(texts(off, "stream")))
      assert.same({ "back here\n" }, texts(back, "stream"))
    end)

    it("names an unknown %%px option as the cell's error, running nothing", function()
      assert.equal("error", seen.unknown_option.reply.status)
      assert.matches("unknown option '%-%-foo'", seen.unknown_option.reply.evalue)
      assert.same({}, texts(seen.unknown_option, "stream"))
    end)

    it("takes %pxconfig's defaults for %px, and a bad one as the cell's error", function()
      local set, ran, bad, reset = table.unpack(seen.pxconfig)
      assert.equal("ok", set.reply.status)
      assert.same({ "Parallel execution on engine(s): 1\n[stdout:1] cfg\n" }, { table.concat(texts(ran, "stream")) })
      assert.equal("error", bad.reply.status)
      assert.matches("no engine 9", bad.reply.evalue)
      assert.same({ "%px defaults: targets all, --block, --no-verbose\n" }, { table.concat(texts(reset, "stream")) })
    end)

    it("completes names and magics, tells complete code from incomplete, inspects", function()
      assert.same({ "math.floor" }, seen.complete_math.matches)
      assert.equal(4, seen.complete_math.cursor_start)
      assert.equal(11, seen.complete_math.cursor_end)
      assert.same({ "%px", "%pxconfig", "%pxresult" }, seen.complete_magic.matches)
      assert.same({ "rc:view" }, seen.complete_rc.matches)
      assert.same({ ["for i = 1, 2 do"] = "incomplete", ["x = 1"] = "complete", ["x = = 1"] = "invalid",
        ["%px x = 1"] = "complete" }, seen.is_complete)
      assert.is_true(seen.inspect.found)
      assert.matches("lpar.px: function\ndefined at .*init.lua:%d+\nRun code on the active view",
        seen.inspect_doc.data["text/plain"])
      assert.matches("lpar.timeit: function\ndefined at .*timeit.lua:%d+", seen.inspect.data["text/plain"])
      assert.equal(3, #seen.history.history)
      local inputs = {}
      for _, h in ipairs(seen.history.history) do inputs[#inputs + 1] = h[3] end
      -- the last three cells, a two-line one whole
      assert.same({ "%pxresult", "%%timeit -n 10 -r 2\nlocal x = 1", "%help" }, inputs)
      assert.same({}, seen.comm_info.comms)
    end)

    it("interrupts a running %px within 2 s by signal, keeping the engines' state", function()
      assert.is_true(seen.interrupt_px.seconds < 2, "took " .. seen.interrupt_px.seconds .. " s")
      assert.equal("error", seen.interrupt_px.reply.status)
      assert.matches("interrupted", seen.interrupt_px.reply.evalue)
      local got = table.concat(texts(seen.after_interrupt, "stream"))
      for id = 0, 3 do assert.matches("%[stdout:" .. id .. "%] alive\t" .. id * 10, got) end
    end)

    it("interrupts a running %px by an interrupt_request too, the error shown under the cell", function()
      assert.is_true(seen.interrupt_px_message.seconds < 2)
      assert.matches("interrupted", seen.interrupt_px_message.reply.evalue)
      local shown
      for _, o in ipairs(seen.interrupt_px_message.outputs) do
        if o.type == "error" then shown = o.content.evalue end
      end
      assert.matches("interrupted", shown)
    end)

    it("interrupts local Lua by an interrupt_request on the control channel", function()
      assert.is_true(seen.interrupt_local.seconds < 2, "took " .. seen.interrupt_local.seconds .. " s")
      assert.equal("KeyboardInterrupt", seen.interrupt_local.reply.ename)
      assert.equal("interrupt_reply", seen.interrupt_local.control_reply)
      -- the error is shown under the cell, though the interrupt came on another channel
      local shown
      for _, o in ipairs(seen.interrupt_local.outputs) do
        if o.type == "error" then shown = o.content.ename end
      end
      assert.equal("KeyboardInterrupt", shown)
    end)

    it("interrupts a local wait on an engine's task, and the task with it", function()
      assert.equal("error", seen.interrupt_wait.reply.status)
      assert.same({ '"free"' }, texts(seen.interrupt_wait.after, "execute_result"))
    end)

    it("interrupts local Lua by signal too", function()
      assert.is_true(seen.interrupt_local_signal.seconds < 2)
      assert.equal("KeyboardInterrupt", seen.interrupt_local_signal.reply.ename)
    end)

    it("reads io.read's input from the frontend (input_request), when it takes input", function()
      assert.equal("input_request", seen.input.request)
      assert.equal("ok", seen.input.reply.status)
      assert.same({ "name? ", "hello lpar\n" }, texts(seen.input, "stream"))
      assert.equal("error", seen.no_input.reply.status)
      assert.matches("takes no input", seen.no_input.reply.evalue)
    end)

    it("inspects a function defined in a cell: its doc comment and, with ??, its source", function()
      assert.is_true(seen.inspect_cell.found)
      assert.matches("^twice: function\ndefined at In%[%d+%]:2\nTwice x%.\nfunction twice%(x%)\n  return 2 %* x\nend$",
        seen.inspect_cell.data["text/plain"])
    end)

    it("shows a non-blocking %%px cell's output and values with %pxresult", function()
      local got = table.concat(texts(seen.pxresult, "stream"))
      for id = 0, 3 do
        assert.matches("%[stdout:" .. id .. "%] nb " .. id, got)
        assert.matches("Out%[" .. id .. "%]: " .. id * 2 .. "\n", got)
      end
    end)

    it("runs %%timeit and %help, and answers a request it cannot serve with an error", function()
      assert.matches("^10 loops, best of 2: [%d.]+ %S+ per loop\n$", table.concat(texts(seen.timeit_cell, "stream")))
      assert.matches("%%cluster start %-n N", table.concat(texts(seen.help, "stream")))
      assert.equal("error", seen.bad_request.status)
    end)

    it("drops a message with a wrong signature, logs it and goes on serving", function()
      assert.same({ "true" }, texts(seen.after_forgery, "execute_result"))
      assert.same({ "nil" }, texts(seen.forged_ran, "execute_result"))
      assert.equal("ok", seen.forged_interrupt.reply.status) -- a forged interrupt stops nothing
      assert.same({ '"finished"' }, texts(seen.forged_interrupt, "execute_result"))
      local f = assert(io.open(prefix .. "/kernel.log"))
      local log = f:read("a")
      f:close()
      assert.matches("dropped a message on shell: bad signature", log)
      assert.matches("dropped a message on control: bad signature", log)
    end)

    it("shuts down on request, leaving no engine behind", function()
      assert.is_false(seen.kernel_alive_after_shutdown)
      assert.is_false(helpers.alive(seen.kernel_pid))
      assert.equal(4, #seen.engine_pids)
      local gone = helpers.poll(function()
        for _, pid in ipairs(seen.engine_pids) do if helpers.alive(pid) then return false end end
        return true
      end, 5)
      assert.is_true(gone, "engines outlived the kernel")
    end)
  end)

  describe("without its frontend", function()
    local seen
    lazy_teardown(function()
      if seen then kill_all(seen.engine_pids) kill_all({ seen.kernel_pid }) end
    end)

    it("ends, with its engines, when the process that started it dies", function()
      seen = drive("orphan", 60)
      assert.equal(2, #seen.engine_pids)
      local gone = helpers.poll(function()
        if helpers.alive(seen.kernel_pid) then return false end
        for _, pid in ipairs(seen.engine_pids) do if helpers.alive(pid) then return false end end
        return true
      end, 10)
      assert.is_true(gone, "the kernel or its engines outlived the frontend")
    end)
  end)

  describe("with standalone clusters", function()
    local dir
    lazy_setup(function()
      dir = prefix .. "/lpar"
      assert(os.execute("mkdir -p " .. sh(dir)))
    end)
    lazy_teardown(function()
      helpers.run("LPAR_DIR=" .. sh(dir) .. " " .. helpers.lpar .. " cluster stop --all 2>&1")
    end)

    it("starts, uses, lists and stops one with %cluster", function()
      local seen = drive("standalone " .. sh(dir), 120)
      assert.matches('cluster "kspec": 2 engines', table.concat(texts(seen.start, "stream")))
      local got = table.concat(texts(seen.px, "stream"))
      assert.matches("%[stdout:0%] standalone 0", got)
      assert.matches("%[stdout:1%] standalone 1", got)
      assert.matches("kspec%s+%d+%s+2/2", table.concat(texts(seen.list, "stream")))
      assert.matches('stopped cluster "kspec"', table.concat(texts(seen.stop, "stream")))
      assert.same({ "true" }, texts(seen.after_stop, "execute_result")) -- its Client was closed first
      local list = helpers.run("LPAR_DIR=" .. sh(dir) .. " " .. helpers.lpar .. " cluster list 2>&1")
      assert.matches("no clusters", list)
    end)
  end)

  describe("with nbclient", function()
    local report
    lazy_setup(function()
      report = drive("notebook " .. sh(assert(os.getenv("PWD")) .. "/examples/notebooks/tutorial.ipynb") ..
        " " .. sh(prefix .. "/executed.ipynb"), 240)
    end)

    it("executes the tutorial notebook, with its outputs", function()
      local by_source = {}
      for _, c in ipairs(report.cells) do
        for _, o in ipairs(c.outputs) do
          assert.are_not.equal("error", o.type, c.source .. ": " .. tostring(o.evalue))
        end
        by_source[c.source:match("^[^\n]*")] = c.outputs
      end
      assert.equal("{0, 1, 2, 3}", by_source["rc = lpar.Cluster{n = 4}:start_and_connect()"][1].text)
      local px = {}
      for _, o in ipairs(by_source["%%px --targets 0::2 --local"]) do
        for line in o.text:gmatch("[^\n]+") do px[#px + 1] = line end
      end
      table.sort(px)
      assert.same({ "10", "[stdout:0] 10", "[stdout:2] 10" }, px)
      local images = by_source["%%px --targets 0::2"]
      assert.equal(2, #images)
      for _, o in ipairs(images) do
        assert.equal("display_data", o.type)
        assert.same({ 250, 250 }, o.size)
      end
      assert.matches("^%d+ loops, best of 3: [%d.]+ %S+ per loop", by_source['%timeit dview:execute("")'][1].text)
      local tiles = by_source["dview:push { B = B }"]
      assert.matches("row tiles on 4 engines", tiles[1].text)
      assert.equal("0.0", tiles[2].text)
    end)

    describe("in Jupyter Notebook's page, read by headless Chromium", function()
      local server_pid
      local function read(path)
        local f = io.open(path)
        if not f then return "" end
        local text = f:read("a")
        f:close()
        return text
      end
      lazy_teardown(function()
        if server_pid then
          -- SIGTERM: the server shuts its kernels down; then make sure.
          require("luv").kill(server_pid, "sigterm")
          if not helpers.poll(function() return not helpers.alive(server_pid) end, 10) then
            require("luv").kill(server_pid, "sigkill")
          end
        end
        -- A kernel the page started runs with a connection file under prefix.
        for _, pid in ipairs(kernels_under(prefix)) do require("luv").kill(pid, "sigkill") end
      end)

      it("shows the notebook's inline images", function()
        local log = prefix .. "/notebook.log"
        local out = helpers.run(string.format("cd %s && %s JUPYTER_CONFIG_DIR=%s setsid jupyter notebook --no-browser "
          .. "--allow-root --ip=127.0.0.1 --port=%d --port-retries=50 --NotebookApp.token=spec-token "
          .. "--notebook-dir=%s >%s 2>&1 & echo $!", sh(prefix), jupyter_env(), sh(prefix .. "/config"),
          20000 + math.random(20000), sh(prefix), sh(log)))
        server_pid = math.tointeger(tonumber(out:match("%d+")))
        assert.is_true(helpers.poll(function() return read(log):find("is running at") ~= nil end, 60),
          "the notebook server did not start:\n" .. read(log))
        local port = assert(read(log):match("http://127%.0%.0%.1:(%d+)/"))
        local profile = prefix .. "/chromium"
        local dom = helpers.run(string.format("timeout 90 chromium --headless --no-sandbox --disable-gpu "
          .. "--disable-background-networking --no-first-run --user-data-dir=%s --virtual-time-budget=15000 "
          .. "--dump-dom %s 2>/dev/null", sh(profile),
          sh("http://127.0.0.1:" .. port .. "/notebooks/executed.ipynb?token=spec-token")))
        local _, images = dom:gsub('<img src="data:image/png;base64,', "")
        assert.equal(2, images, "inline images on the page:\n" .. dom:sub(1, 2000))
        assert.truthy(dom:find("[stdout:0] 10", 1, true))
        assert.truthy(dom:find("Lua 5.4 (lpar)", 1, true))
        -- The page started a kernel for the notebook: it is ours, and it runs.
        assert.is_true(helpers.poll(function() return #kernels_under(prefix) >= 1 end, 10))
      end)
    end)
  end)
end)
