--- lpar.kernel: the Jupyter kernel, `lpar kernel -f CONNECTION_FILE`.
-- Cells are Lua 5.4 chunks run in this process, with the prompt's magics
-- (lpar.prompt's Session): %px, %%px, %pxconfig, %autopx, %pxresult, %timeit, %%timeit,
-- %lsmagic, %help, and %cluster start/stop/list for standalone clusters.
-- An expression, or a cell's last line when it is one, shows its value.
--
-- One loop serves it all. Shell requests are queued by the socket callbacks
-- and run one at a time from the main loop, outside any luv callback, each
-- cell in a coroutine of its own: so a cell can wait on engines (which runs
-- the loop again, streaming their output to iopub meanwhile), and an
-- interrupt can raise in the cell without touching the loop's callbacks.
-- Control requests (interrupt, shutdown, kernel_info) are answered at once,
-- even while a cell runs.
local uv = require "luv"
local zmq = require "lpar.zmq"
local jupyter = require "lpar.jupyter"
local lpar = require "lpar"
local px = require "lpar.px"
local prompt = require "lpar.prompt"
local errors = require "lpar.errors"

local kernel = {}

local show = prompt.show
local MAGICS = setmetatable({
  ["%cluster"] = "%cluster start -n N [--profile P] | stop [--profile P] | list:"
    .. " standalone clusters, as `lpar cluster` runs them (start also connects rc and dview)",
}, { __index = prompt.MAGICS })

local Kernel = {}
Kernel.__index = Kernel

-- ---- output: streams, results, display data, errors ----

--- Publish on iopub, caused by the request being served.
function Kernel:publish(msg_type, content)
  if self.silent then return end
  self:flush_stream() -- what was printed before comes first
  jupyter.publish(self.conn, msg_type, content, self.parent)
end

-- Output is gathered into one stream message per burst, as ipykernel does:
-- sent when the other stream writes, when anything else is published, when
-- 64 KiB are waiting, at the end of the cell, and every 50 ms while the
-- cell waits on engines (the loop runs then). A cell printing a million
-- lines sends a few hundred messages, not a million.
local STREAM_FLUSH_BYTES, STREAM_FLUSH_MS = 65536, 50

function Kernel:flush_stream()
  local b = self.stream_buffer
  if #b.parts == 0 then return end
  local text = table.concat(b.parts)
  b.parts, b.size = {}, 0
  jupyter.publish(self.conn, "stream", { name = b.name, text = text }, self.parent)
end

function Kernel:stream(name, text)
  if text == "" or self.silent then return end
  local b = self.stream_buffer
  if b.name ~= name then
    self:flush_stream()
    b.name = name
  end
  b.parts[#b.parts + 1] = text
  b.size = b.size + #text
  if b.size >= STREAM_FLUSH_BYTES then self:flush_stream() end
end

--- A file-like object whose writes become stream messages. The engines'
-- output comes labelled ("[stderr:2] ..."), and goes to the stream it names.
function Kernel:stream_file(name)
  local kernel_self = self
  local file = {}
  function file.write(f, ...)
    local text = table.concat({ ... })
    local stream = name
    if text:match("^%[stderr:%d+%] ") then stream = "stderr" end
    kernel_self:stream(stream, text)
    return f
  end
  function file.flush(f) return f end
  function file.setvbuf() return true end
  function file.close() return true end
  return file
end

--- display_data for one mime type and its data (bytes for an image).
function Kernel:display(bundle, metadata)
  if type(bundle) ~= "table" then error("display: expected a mime bundle {['text/html'] = ...}", 2) end
  local data = {}
  for mime, value in pairs(bundle) do
    if type(mime) ~= "string" or type(value) ~= "string" then
      error("display: a bundle maps mime types to strings", 2)
    end
    data[mime] = mime:match("^image/") and mime ~= "image/svg+xml" and zmq.base64(value) or value
  end
  if data["text/plain"] == nil then data["text/plain"] = "<display data>" end
  self:publish("display_data", { data = data, metadata = metadata or {}, transient = {} })
end

local function png_size(data)
  if #data < 24 or data:sub(1, 8) ~= "\137PNG\r\n\26\n" then return nil end
  return string.unpack(">I4I4", data, 17)
end

--- ar:wait_interactive() in a cell: a progress line, updated in place
-- (display_data, then update_display_data with the same display_id).
function Kernel:progress(ar, done, total, seconds, final)
  local width = 30
  local fill = total > 0 and math.floor(width * done / total) or width
  local rate = seconds > 0 and done / seconds or 0
  local text = final and string.format("%d/%d tasks done in %.2fs", total, total, seconds)
    or string.format("[%s%s] %d/%d tasks, %.1f/s", string.rep("#", fill), string.rep(" ", width - fill),
      done, total, rate)
  local ids = self.progress_ids
  local id = ids[ar]
  local content = { data = { ["text/plain"] = text }, metadata = {}, transient = { display_id = id } }
  if id then
    self:publish("update_display_data", content)
  else
    id = jupyter.Session().id -- a fresh random id
    ids[ar] = id
    content.transient.display_id = id
    self:publish("display_data", content)
  end
end

--- An engine's display output (lpar.plot.imshow there): shown inline.
function Kernel:display_output(o)
  local w, h = png_size(o.data)
  local text = w and string.format("<image %dx%d from engine %d>", w, h, o.engine)
    or string.format("<%s from engine %d>", o.type, o.engine)
  local meta = {}
  if w then meta[o.type] = { width = w, height = h } end
  self:display({ [o.type] = o.data, ["text/plain"] = text }, meta)
end

--- ename, evalue and traceback lines for an error value.
local function describe_error(err)
  local mt = getmetatable(err)
  if mt == errors.RemoteError or mt == errors.CompositeError then
    local list = mt == errors.CompositeError and err.errors or { err }
    local lines, first = {}, nil
    for _, g in ipairs(px.group_errors(list)) do
      local text = getmetatable(g.err) == errors.RemoteError and px.error_label(g) or tostring(g.err)
      lines[#lines + 1] = text
      if getmetatable(g.err) == errors.RemoteError and g.err.traceback then lines[#lines + 1] = g.err.traceback end
      first = first or text
    end
    if mt == errors.CompositeError then
      return "CompositeError", string.format("%d engines failed: %s", #list, first), lines
    end
    return "RemoteError", first, lines
  end
  if type(err) == "table" and mt and mt.__name then
    local text = tostring(err)
    return mt.__name, text:match("^[^\n]*"), { text }
  end
  local text = tostring(err)
  if text:match("KeyboardInterrupt") then return "KeyboardInterrupt", "interrupted", { "KeyboardInterrupt" } end
  return "LuaError", text:match("^[^\n]*"), { text }
end

--- Raise `err` as the cell's error (the cell stops there).
local function cell_error(err) error({ cell_error = err }, 0) end

-- ---- running code ----

--- Compile a Lua cell: an expression returns its values; so does a last
-- line that is an expression after statements (IPython's rule).
local function compile(code, name)
  return load(px.returning(code, name) or code, name)
end

function Kernel:run_lua(code)
  local f, err = compile(code, "=In[" .. self.count .. "]")
  if not f then cell_error(err) end
  local results = table.pack(xpcall(f, prompt.user_traceback))
  if not results[1] then cell_error(results[2]) end
  if results.n > 1 then
    local parts = {}
    for i = 2, results.n do parts[#parts + 1] = show(results[i]) end
    self.result = table.concat(parts, "\t")
  end
end

--- %px and %%px: on the engines, their output streamed to iopub, images
-- inline, errors as the cell's error.
function Kernel:px(code, opts)
  opts = px.magic_options(opts) -- what the cell does not say, from %pxconfig
  local failure
  opts.out = io.stdout
  opts.on_error = function(err) failure = err end
  opts.on_display = function(o) self:display_output(o) end
  self.px_running = true
  zmq.interrupt_target(self.cell, false) -- an interrupt goes to the engines
  local ok, ar = pcall(px.run, code, opts)
  zmq.interrupt_target(self.cell, true)
  self.px_running = false
  if not ok then cell_error(ar) end
  if opts.block == false then
    self.session.last_px = ar
    io.stdout:write(string.format("<AsyncResult: execute on %d engines; %%pxresult shows it>\n", #ar))
  end
  if failure then cell_error(failure) end
end

local function parse_px(args, leading)
  local ok, opts, rest = pcall(prompt.parse_px_options, args, leading)
  if not ok then cell_error(opts) end
  return opts, rest
end

--- %cluster start|stop|list, for standalone clusters (the Clusters tab).
function Kernel:cluster_magic(args)
  local words = {}
  for w in args:gmatch("%S+") do words[#words + 1] = w end
  local sub = words[1]
  local commands = require "lpar.commands"
  if sub == "list" then
    require("lpar.cli").main { "cluster", "list" }
    return
  end
  local name, n = "default", "4"
  for i = 2, #words do
    if words[i] == "--profile" then name = words[i + 1]
    elseif words[i] == "-n" then n = words[i + 1] end
  end
  if sub == "start" then
    local pid, address = commands.start_daemon(name, { "-n", tostring(n) })
    if not pid then cell_error(address) end
    local rc = lpar.Client { profile = name }
    self.cluster_clients[name] = rc
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
    print(string.format("cluster %q: %d engines, controller pid %d on %s; rc is its Client, dview a blocking view",
      name, #rc, pid, address))
  elseif sub == "stop" then
    local rc = self.cluster_clients[name] -- detach first: the cluster is going away
    self.cluster_clients[name] = nil
    if rc then
      pcall(rc.close, rc)
      if _G.rc == rc then _G.rc, _G.dview = nil, nil end
    end
    local ok, said = pcall(commands.stop_cluster, name)
    if not ok then cell_error(said) end
    print(said)
  else
    cell_error("usage: " .. MAGICS["%cluster"])
  end
end

function Kernel:magic(line, body)
  local name, args = line:match("^(%%%%?[%w_]+)%s*(.-)%s*$")
  if name == "%px" then
    local opts, code = parse_px(args, true) -- %px --targets 1 print(1)
    return self:px(code, opts)
  elseif name == "%%px" then
    local opts, rest = parse_px(args)
    if rest ~= "" then cell_error(string.format("%%%%px: unknown option '%s'", rest)) end
    return self:px(body or "", opts)
  elseif name == "%cluster" then
    return self:cluster_magic(args)
  elseif name == "%pxconfig" then
    local ok, err = pcall(function() px.configure(prompt.parse_pxconfig(args)) end)
    if not ok then cell_error(err) end
    if not args:match("%S") then print(prompt.describe_pxconfig()) end
    return
  elseif name == "%lsmagic" then
    local names = {}
    for k in pairs(prompt.MAGICS) do names[#names + 1] = k end
    names[#names + 1] = "%cluster"
    table.sort(names)
    print("Available magics: " .. table.concat(names, " "))
    return
  elseif name == "%help" then
    self.session:magic("%help")
    print(MAGICS["%cluster"])
    return
  elseif name == "%pxresult" then
    local ar = self.session.last_px
    if not ar then print("no non-blocking %px yet") return end
    ar:wait()
    for _, s in ipairs(ar._slots) do
      for _, stream in ipairs { "stdout", "stderr" } do
        if s[stream] then
          local text = table.concat(s[stream]):gsub("\n$", "")
          local label = string.format("[%s:%d] ", stream, s.engine)
          io.stdout:write(label, (text:gsub("\n", "\n" .. label)), "\n")
        end
      end
    end
    for _, o in ipairs(ar.outputs) do self:display_output(o) end
    if not ar:successful() then
      local ok, err = pcall(ar.get, ar)
      if not ok then cell_error(err) end
    end
    for _, s in ipairs(ar._slots) do
      if s.values and s.values.n > 0 then
        local parts = {}
        for i = 1, s.values.n do parts[i] = show(s.values[i]) end
        io.stdout:write(string.format("Out[%d]: %s\n", s.engine, table.concat(parts, "\t")))
      end
    end
    return
  end
  -- The rest are the prompt's own: %autopx, %timeit, %%timeit.
  if not MAGICS[name or ""] then cell_error(string.format("unknown magic %s (%%lsmagic lists them)", line)) end
  self.session:magic(line, body)
end

--- A cell: a %% magic over the whole cell, or Lua with % lines among it.
function Kernel:run_cell(code)
  if self.session.autopx and not code:match("^%s*%%autopx%s*$") then return self:px(code) end
  local first, rest = code:match("^%s*(%%%%[^\n]*)\n?(.*)$")
  if first then return self:magic(first, rest) end
  local pending = {}
  local function flush()
    local chunk = table.concat(pending, "\n")
    pending = {}
    if chunk:match("%S") then self:run_lua(chunk) end
  end
  for line in (code .. "\n"):gmatch("([^\n]*)\n") do
    if line:match("^%s*%%") then
      flush()
      self.result = nil -- only the cell's last part shows its value
      self:magic(line:match("^%s*(.-)%s*$"))
    else
      pending[#pending + 1] = line
    end
  end
  flush()
end

--- io.read in a cell: an input_request to the frontend on the stdin
-- channel, and its input_reply's value (formats "l", "L", "n"; "a" reads one
-- line too). A frontend that takes no input makes it an error.
function Kernel:read_input(fmt)
  local msg = self.parent
  if not (msg and msg.content.allow_stdin) then
    error("io.read: this frontend takes no input (allow_stdin is false)", 2)
  end
  self:flush_stream() -- the prompt the cell printed comes first
  self.input = nil
  jupyter.reply_on(self.conn, "stdin", msg, "input_request", { prompt = "", password = false })
  require("lpar.wait").until_done(function() return self.input ~= nil end)
  local value = self.input
  self.input = nil
  fmt = type(fmt) == "string" and fmt:gsub("^%*", "") or fmt
  if fmt == "n" then return tonumber(value) end
  if fmt == "L" then return value .. "\n" end
  return value
end

function Kernel:on_stdin(msg)
  if msg.header.msg_type == "input_reply" then self.input = tostring(msg.content.value or "") end
end

--- Run a cell in its own coroutine, with print and io.write going to iopub.
-- Returns nil on success, else the error value.
function Kernel:execute_code(code)
  local saved = { print = print, stdout = io.stdout, stderr = io.stderr, write = io.write, read = io.read }
  local out, err_out = self:stream_file("stdout"), self:stream_file("stderr")
  _G.print = function(...)
    local parts = table.pack(...)
    for i = 1, parts.n do parts[i] = tostring(parts[i]) end
    out:write(table.concat(parts, "\t", 1, parts.n), "\n")
  end
  -- luacheck: push ignore 122 (io's fields are the cell's output while it runs)
  io.stdout, io.stderr = out, err_out
  io.write = function(...) out:write(...) return out end
  io.read = function(fmt) return self:read_input(fmt) end
  -- luacheck: pop
  self.result = nil
  local co = coroutine.create(function() return self:run_cell(code) end)
  self.cell = co
  zmq.interrupt_target(co, true)
  self.flusher:again()
  local ok, err = coroutine.resume(co)
  self.flusher:stop()
  self:flush_stream()
  if ok and coroutine.status(co) ~= "dead" then
    ok, err = false, "a cell cannot yield at its top level"
  end
  zmq.interrupt_target(nil, false)
  -- An interrupt whose hook stopped the cell before the loop read the pipe
  -- still reaches the engines; and none is left over for the next cell.
  if zmq.drain_interrupts() > 0 then self:interrupt_engines() end
  self.cell = nil
  _G.print = saved.print
  io.stdout, io.stderr, io.write, io.read = saved.stdout, saved.stderr, saved.write, saved.read -- luacheck: ignore 122
  if ok then return nil end
  if type(err) == "table" and err.cell_error ~= nil then err = err.cell_error end
  return err
end

-- ---- requests ----

local LANGUAGE_INFO = {
  name = "lua", version = "5.4", mimetype = "text/x-lua", file_extension = ".lua",
  pygments_lexer = "lua", codemirror_mode = "lua",
}

function Kernel:kernel_info_request(msg)
  jupyter.reply(self.conn, msg, "kernel_info_reply", {
    status = "ok", protocol_version = jupyter.PROTOCOL_VERSION, implementation = "lpar",
    implementation_version = lpar.version, language_info = LANGUAGE_INFO,
    banner = string.format("lpar %s: parallel Lua 5.4 (%%help for the magics)", lpar.version),
    help_links = jupyter.list {},
  })
end

function Kernel:user_expressions(exprs)
  local out = {}
  for name, expr in pairs(exprs or {}) do
    local f, err = load("return " .. tostring(expr), "=user_expression")
    local ok, value
    if f then ok, value = pcall(f) else ok, value = false, err end
    if ok then
      out[name] = { status = "ok", data = { ["text/plain"] = show(value) }, metadata = {} }
    else
      local ename, evalue, tb = describe_error(value)
      out[name] = { status = "error", ename = ename, evalue = evalue, traceback = tb }
    end
  end
  return out
end

function Kernel:execute_request(msg)
  local c = msg.content
  local code = type(c.code) == "string" and c.code or ""
  local silent = c.silent == true
  local store = c.store_history ~= false and not silent
  if store then self.count = self.count + 1 end
  local count = self.count
  self.silent = silent
  self:publish("execute_input", { code = code, execution_count = count })
  if store then self.history[#self.history + 1] = { count, code } end
  local err = self:execute_code(code)
  local reply
  if err == nil then
    if self.result then
      self:publish("execute_result", { execution_count = count, data = { ["text/plain"] = self.result },
        metadata = {} })
    end
    reply = { status = "ok", execution_count = count, payload = jupyter.list {},
              user_expressions = self:user_expressions(c.user_expressions) }
  else
    local ename, evalue, tb = describe_error(err)
    self:publish("error", { ename = ename, evalue = evalue, traceback = tb })
    reply = { status = "error", execution_count = count, ename = ename, evalue = evalue, traceback = tb }
    if c.stop_on_error ~= false then self.abort_queued = true end
  end
  self.silent = false
  jupyter.reply(self.conn, msg, "execute_reply", reply)
end

--- The word before the cursor: "rc:vi", "math.s", "%px".
local function word_at(code, cursor)
  local byte = utf8.offset(code, cursor + 1) or (#code + 1)
  local before = code:sub(1, byte - 1)
  return before:match("[%w_%.:]*$"), before
end

function Kernel:complete_request(msg)
  local code = msg.content.code or ""
  local cursor = math.tointeger(msg.content.cursor_pos) or utf8.len(code) or #code
  local word, before = word_at(code, cursor)
  local matches
  local magic = before:match("^%s*(%%%%?[%w_]*)$")
  if magic then
    matches = {}
    local names = {}
    for k in pairs(MAGICS) do names[#names + 1] = k end
    for k in pairs(prompt.MAGICS) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do
      if k:sub(1, #magic) == magic and k ~= matches[#matches] then matches[#matches + 1] = k end
    end
    word = magic
  else
    matches = prompt.completer(word)
  end
  jupyter.reply(self.conn, msg, "complete_reply", {
    status = "ok", matches = jupyter.list(matches), cursor_start = cursor - utf8.len(word),
    cursor_end = cursor, metadata = {},
  })
end

--- The first `last` lines of file `path` (all when nil), or nil.
local function read_lines(path, last)
  local f = io.open(path, "r")
  if not f then return nil end
  local lines = {}
  for l in f:lines() do
    lines[#lines + 1] = l
    if last and #lines >= last then break end
  end
  f:close()
  return lines
end

--- The doc comment above line `line` of `lines` (the "--" lines just before).
local function doc_comment(lines, line)
  local doc = {}
  for i = line - 1, 1, -1 do
    local text = lines[i] and lines[i]:match("^%s*%-%-%-?%s?(.*)$")
    if not text then break end
    table.insert(doc, 1, text)
  end
  return #doc > 0 and table.concat(doc, "\n") or nil
end

--- What is known of the name at the cursor: its type, value, and for a
-- function where it was defined and its doc comment.
-- With `detail` 1 or more (Jupyter's ??), a Lua function's source too: from
-- its file, or from the cell that defined it (`cells(n)` gives cell n).
function kernel.describe(name, detail, cells)
  local value = _G
  for part in name:gmatch("[^%.:]+") do
    if type(value) ~= "table" and type(value) ~= "userdata" then return nil end
    local ok, v = pcall(function() return value[part] end)
    if not ok or v == nil then return nil end
    value = v
  end
  local lines = { string.format("%s: %s", name, type(value)) }
  if type(value) == "function" then
    local info = debug.getinfo(value, "S")
    if info.what == "C" then
      lines[#lines + 1] = "a C function"
    else
      local path = info.source:match("^@(.*)$")
      lines[#lines + 1] = string.format("defined at %s:%d", path or info.short_src, info.linedefined)
      local text = path and read_lines(path, info.lastlinedefined)
        or cells and cells(math.tointeger(tonumber(info.source:match("^=In%[(%d+)%]$"))))
      local doc = text and doc_comment(text, info.linedefined)
      if doc then lines[#lines + 1] = doc end
      if text and (detail or 0) >= 1 then
        lines[#lines + 1] = table.concat(text, "\n", info.linedefined, math.min(#text, info.lastlinedefined))
      end
    end
  else
    lines[#lines + 1] = show(value)
  end
  return table.concat(lines, "\n")
end

function Kernel:inspect_request(msg)
  local code = msg.content.code or ""
  local cursor = math.tointeger(msg.content.cursor_pos) or #code
  local word = word_at(code, cursor)
  local byte = utf8.offset(code, cursor + 1) or (#code + 1)
  word = word .. (code:sub(byte):match("^[%w_]*") or "")
  local text = word ~= "" and kernel.describe(word, math.tointeger(msg.content.detail_level), function(n)
    for _, h in ipairs(self.history) do
      if h[1] == n then
        local lines = {}
        for l in (h[2] .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
        return lines
      end
    end
  end)
  jupyter.reply(self.conn, msg, "inspect_reply", {
    status = "ok", found = text and true or false,
    data = text and { ["text/plain"] = text } or {}, metadata = {},
  })
end

function Kernel:is_complete_request(msg)
  local code = msg.content.code or ""
  local status, indent = "complete", nil
  if not code:match("^%s*%%") then
    local f, err = load(code, "=cell")
    if not f and not load("return " .. code, "=cell") then
      if err:find("<eof>$") then status, indent = "incomplete", "  " else status = "invalid" end
    end
  end
  jupyter.reply(self.conn, msg, "is_complete_reply", { status = status, indent = indent })
end

function Kernel:history_request(msg)
  local c = msg.content
  local list = {}
  local function add(h) list[#list + 1] = { 0, h[1], h[2] } end
  if c.hist_access_type == "range" then
    local start, stop = tonumber(c.start) or 1, tonumber(c.stop) or math.huge
    for _, h in ipairs(self.history) do if h[1] >= start and h[1] < stop then add(h) end end
  elseif c.hist_access_type == "search" then
    local pattern = tostring(c.pattern or "*"):gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", ".*"):gsub("%?", ".")
    for _, h in ipairs(self.history) do if h[2]:match("^" .. pattern .. "$") then add(h) end end
  else -- tail
    local n = tonumber(c.n) or 10
    for i = math.max(1, #self.history - n + 1), #self.history do add(self.history[i]) end
  end
  jupyter.reply(self.conn, msg, "history_reply", { status = "ok", history = jupyter.list(list) })
end

function Kernel:comm_info_request(msg)
  jupyter.reply(self.conn, msg, "comm_info_reply", { status = "ok", comms = {} })
end

--- The stop button while a cell runs: the tasks this kernel's client has
-- running on the engines are interrupted too (only those: a standalone
-- cluster's engines may be running another client's tasks).
function Kernel:interrupt_engines()
  if not self.cell then return end
  local view = px.active_view()
  local hub = view and view.client._hub
  if not hub then return end
  for id, rec in pairs(hub.pending) do
    if rec.engine then pcall(hub.interrupt_task, hub, rec.engine, id) end
  end
end

function Kernel:interrupt_request(msg)
  zmq.interrupt() -- as SIGINT does: the cell's Lua stops, the pipe tells the engines
  jupyter.reply(self.conn, msg, "interrupt_reply", { status = "ok" })
end

function Kernel:shutdown_request(msg)
  self.restart = msg.content.restart == true
  jupyter.reply(self.conn, msg, "shutdown_reply", { status = "ok", restart = self.restart })
  self.done = true
  if self.cell then zmq.interrupt() end
end

-- Requests that must be answered even while a cell runs.
local IMMEDIATE = { kernel_info_request = true, interrupt_request = true, shutdown_request = true }

--- Serve one request, between busy and idle.
function Kernel:serve(msg)
  local t = msg.header.msg_type
  local handler = type(t) == "string" and t:match("_request$") and Kernel[t]
  if not handler then
    self.log("ignored a " .. tostring(t) .. " message")
    return
  end
  -- A control request served while a cell runs must not take the cell's
  -- parent: the cell's output and error still belong under the cell.
  self:flush_stream() -- buffered output goes out under its own cell
  local outer = self.parent
  self.parent = msg
  jupyter.publish(self.conn, "status", { execution_state = "busy" }, msg)
  local ok, err = xpcall(handler, debug.traceback, self, msg)
  if not ok then
    -- A request the kernel failed to serve still gets its reply: a frontend
    -- would wait for it forever.
    self.log("error serving " .. t .. ": " .. tostring(err))
    jupyter.reply(self.conn, msg, (t:gsub("_request$", "_reply")), {
      status = "error", ename = "KernelError", evalue = tostring(err):match("^[^\n]*"),
      traceback = { tostring(err) },
    })
  end
  jupyter.publish(self.conn, "status", { execution_state = "idle" }, msg)
  self.parent = outer
end

function Kernel:on_shell(msg)
  if IMMEDIATE[msg.header.msg_type] and (msg.header.msg_type ~= "kernel_info_request" or self.cell) then
    return self:serve(msg)
  end
  self.queue[#self.queue + 1] = msg
end

function Kernel:next_request()
  local msg = table.remove(self.queue, 1)
  if msg and self.abort_queued and msg.header.msg_type == "execute_request" then
    -- After an error, the cells queued behind it are aborted, as ipykernel does.
    jupyter.publish(self.conn, "status", { execution_state = "busy" }, msg)
    jupyter.reply(self.conn, msg, "execute_reply", { status = "aborted", execution_count = self.count })
    jupyter.publish(self.conn, "status", { execution_state = "idle" }, msg)
    return self:next_request()
  end
  return msg
end

--- Run the kernel until a shutdown request. Returns an exit status.
function kernel.run(path)
  local self = setmetatable({ queue = {}, history = {}, count = 0, stream_buffer = { parts = {}, size = 0 },
    cluster_clients = {} }, Kernel)
  local stderr = io.stderr
  self.log = function(text) stderr:write("lpar kernel: ", text, "\n") stderr:flush() end
  local interrupts = assert(zmq.interrupt_pipe()) -- first: the control relay uses its handler
  local ok, conn = pcall(jupyter.open, path, {
    shell = function(msg) self:on_shell(msg) end,
    control = function(msg) self:serve(msg) end,
    stdin = function(msg) self:on_stdin(msg) end,
    log = self.log,
  })
  if not ok then
    self.log(tostring(conn))
    return 1
  end
  self.conn = conn
  -- The prompt's session runs the magics it owns; output goes to iopub.
  self.session = setmetatable({ rl = { readline = function() return nil end, add_history = function() end } },
    { __index = prompt.Session })
  function self.session.write(_, ...) io.stdout:write(...) end
  _G.lpar = lpar
  lpar.display = function(bundle, metadata) self:display(bundle, metadata) end
  self.flusher = uv.new_timer()
  self.flusher:start(STREAM_FLUSH_MS, STREAM_FLUSH_MS, function() self:flush_stream() end)
  self.flusher:stop() -- armed by each cell (timer:again)
  self.flusher:unref()
  self.progress_ids = setmetatable({}, { __mode = "k" })
  require("lpar.asyncresult").progress = function(...) self:progress(...) end
  local plot = require "lpar.plot"
  local imshow = plot.imshow
  plot.imshow = function(A, opts) -- a local image shows inline too
    local png, w, h = imshow(A, opts)
    self:display({ ["image/png"] = png, ["text/plain"] = string.format("<image %dx%d>", w, h) },
      { ["image/png"] = { width = w, height = h } })
    return png, w, h
  end
  -- SIGINT (the notebook's stop button): the cell's Lua stops by the hook;
  -- the engines are interrupted from the loop.
  local pipe = uv.new_poll(interrupts)
  pipe:start("r", function()
    if zmq.drain_interrupts() > 0 then self:interrupt_engines() end
  end)
  -- A kernel whose frontend died without shutting it down ends too (as
  -- ipykernel's parent poller does): its parent is then someone else.
  local parent = uv.os_getppid()
  local orphan = uv.new_timer()
  orphan:start(1000, 1000, function()
    if uv.os_getppid() ~= parent and not self.done then
      self.log("the frontend (pid " .. math.tointeger(parent) .. ") is gone: shutting down")
      self.done = true
      if self.cell then zmq.interrupt() end
    end
  end)
  orphan:unref()
  jupyter.publish(conn, "status", { execution_state = "starting" })
  while not self.done do
    local msg = self:next_request()
    if msg then
      self:serve(msg)
      if #self.queue == 0 then self.abort_queued = false end
    else
      uv.run("once")
    end
  end
  pipe:stop()
  pipe:unref()
  orphan:stop()
  jupyter.close(conn)
  -- Clusters this kernel started stop now, whatever cells kept them in.
  _G.rc, _G.dview = nil, nil
  collectgarbage()
  collectgarbage()
  return 0
end

return kernel
