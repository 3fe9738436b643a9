--- The interactive prompt: `lpar` or `lpar -n 4`.
-- Lua chunks as lua5.4's prompt takes them (continued with ">>" while
-- incomplete, expression values printed), libedit line editing with history
-- in the lpar directory, and IPython's magics: %px, %%px, %pxconfig,
-- %autopx, %pxresult, %timeit, %%timeit, %lsmagic, %help.
local lpar = require "lpar"
local px = require "lpar.px"
local uv = require "luv"
local wait = require "lpar.wait"

local prompt = {}

local MAGICS = {
  ["%px"] = "%px CODE: run CODE on the active view (all engines unless activated)",
  ["%%px"] = "%%px [--targets T] [--local] [--block|--noblock] [--group-outputs engine|order]:"
    .. " run the cell (lines until a blank one) on the engines",
  ["%pxconfig"] = "%pxconfig [--targets T] [--block|--noblock] [--verbose|--no-verbose]:"
    .. " the defaults of %px and %%px (no options: show them)",
  ["%autopx"] = "%autopx: send every line to the engines, until %autopx again",
  ["%pxresult"] = "%pxresult: show the result of the last non-blocking %px",
  ["%timeit"] = "%timeit [-n N] [-r R] STATEMENT: time a Lua statement",
  ["%%timeit"] = "%%timeit [-n N] [-r R]: time the cell (lines until a blank one)",
  ["%lsmagic"] = "%lsmagic: list the magics",
  ["%help"] = "%help: this help",
}

--- A readable, abbreviated rendering of a value, as the prompt prints it.
local function show(v, depth, seen)
  depth, seen = depth or 0, seen or {}
  if type(v) == "string" then
    -- Long or binary strings (an image's bytes, say) are cut, with their size.
    if #v > 80 or v:find("[%z\1-\8\14-\31\127-\255]") then
      local head = v:sub(1, 24):gsub("[^%w%p ]", ".")
      return string.format("%q... (%d bytes)", head, #v)
    end
    return string.format("%q", v)
  end
  if type(v) ~= "table" or getmetatable(v) and getmetatable(v).__tostring then return tostring(v) end
  if seen[v] then return "<cycle>" end
  if depth >= 2 then return "{...}" end
  seen[v] = true
  local parts, n = {}, 0
  for i, x in ipairs(v) do
    n = n + 1
    if n > 10 then parts[#parts + 1] = "..." break end
    parts[#parts + 1] = show(x, depth + 1, seen)
    local _ = i
  end
  local len = #v
  local keys = {}
  for k in pairs(v) do
    if not (math.type(k) == "integer" and k >= 1 and k <= len) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for i, k in ipairs(keys) do
    if n + i > 12 then parts[#parts + 1] = "..." break end
    local key = type(k) == "string" and k:match("^[%a_][%w_]*$") and k or "[" .. show(k, 2) .. "]"
    parts[#parts + 1] = key .. " = " .. show(v[k], depth + 1, seen)
  end
  seen[v] = nil
  return "{" .. table.concat(parts, ", ") .. "}"
end
prompt.show = show

--- A traceback cut where the user's chunk was called: the frames below it
-- (the prompt's, the kernel's) say nothing to the user.
local function user_traceback(msg)
  if type(msg) ~= "string" then return msg end -- an error object keeps its fields
  local lines = {}
  for line in debug.traceback(msg, 2):gmatch("[^\n]+") do
    if line:find("[C]: in function 'xpcall'", 1, true) then break end
    lines[#lines + 1] = line
  end
  return table.concat(lines, "\n")
end
prompt.user_traceback = user_traceback

local function lpar_dir()
  return os.getenv("LPAR_DIR") or ((os.getenv("HOME") or ".") .. "/.lpar")
end

--- Split "--targets 0::2 --local" style options off a magic's arguments.
-- Returns the options and the other words; with `leading` (a %px line),
-- options are read only up to the first other word, and the rest of the
-- line is returned as it is: the code.
local function parse_px_options(args, leading)
  local opts, rest = {}, {}
  local pos = 1
  while true do
    local start, w, stop = args:match("^%s*()(%S+)()", pos)
    if not start then break end
    local function value(what)
      local _, v, after = args:match("^%s*()(%S+)()", stop)
      if not v then error("%px: " .. what .. " needs a value", 0) end
      stop = after
      return v
    end
    if w == "--targets" or w == "--target" or w == "-t" then
      local t = value(w)
      opts.targets = (t == "all") and nil or (math.tointeger(tonumber(t)) or t)
    elseif w == "--local" then
      opts.locally = true
    elseif w == "--block" then
      opts.block = true
    elseif w == "--noblock" then
      opts.block = false
    elseif w == "--group-outputs" then
      opts.group_outputs = value(w)
      if opts.group_outputs ~= "engine" and opts.group_outputs ~= "order" then
        error("%px: --group-outputs takes engine or order", 0)
      end
    elseif leading then
      return opts, args:sub(start)
    else
      rest[#rest + 1] = w
    end
    pos = stop
  end
  return opts, table.concat(rest, " ")
end

local PXCONFIG_USAGE = "--targets T, --block, --noblock, --verbose, --no-verbose"

--- The options of a %pxconfig line: {targets =, block =, verbose =}, each
-- nil when not given. Raises on anything else.
local function parse_pxconfig(args)
  local opts, words, i = {}, {}, 1
  for w in args:gmatch("%S+") do words[#words + 1] = w end
  while i <= #words do
    local w = words[i]
    if w == "--targets" or w == "--target" or w == "-t" then
      local t = words[i + 1]
      if not t then error("%pxconfig: " .. w .. " needs a value", 0) end
      opts.targets = math.tointeger(tonumber(t)) or t
      i = i + 1
    elseif w == "--block" then opts.block = true
    elseif w == "--noblock" then opts.block = false
    elseif w == "--verbose" then opts.verbose = true
    elseif w == "--no-verbose" then opts.verbose = false
    else
      error(string.format("%%pxconfig: unknown option '%s' (%s)", w, PXCONFIG_USAGE), 0)
    end
    i = i + 1
  end
  return opts
end

--- The magics' defaults as a line: "targets all, --block, --no-verbose".
local function describe_pxconfig()
  local c = px.config()
  local t = c.targets
  if type(t) == "table" then t = table.concat(t, ",") end
  return string.format("%%px defaults: targets %s, %s, %s", t == nil and "all" or tostring(t),
    c.block and "--block" or "--noblock", c.verbose and "--verbose" or "--no-verbose")
end

local function parse_timeit_options(args)
  local opts = {}
  local rest = args:gsub("^%s*%-n%s+(%d+)", function(n) opts.number = tonumber(n) return "" end)
  rest = rest:gsub("^%s*%-r%s+(%d+)", function(r) opts.rep = tonumber(r) return "" end)
  rest = rest:gsub("^%s*%-n%s+(%d+)", function(n) opts.number = tonumber(n) return "" end)
  return opts, rest
end

--- Load a chunk the way lua5.4's prompt does: first as an expression.
local function load_chunk(code)
  local f = load("return " .. code, "=stdin")
  if f then return f, nil, true end
  local err
  f, err = load(code, "=stdin")
  return f, err, false
end

local function incomplete(err)
  return err and err:find("<eof>$") ~= nil
end

--- One prompt session. `io` lets the specs drive it: readline(prompt),
-- add_history(line), write(text).
local Session = {}
Session.__index = Session

function Session:write(...) io.stdout:write(...) end

function Session:px(code, opts)
  if not self.rc then
    self:write("no engines: start the prompt with `lpar -n N`, or make a Cluster\n")
    return
  end
  opts = px.magic_options(opts) -- what the cell does not say, from %pxconfig
  -- Ctrl-C while a blocking cell runs interrupts the engines' code (the wait does).
  local ok, ar = pcall(px.run, code, opts, self.rc)
  if not ok then
    px.show_error(ar)
    return
  end
  if opts.block == false then
    self.last_px = ar
    self:write(string.format("<AsyncResult: execute on %d engines; %%pxresult shows it>\n", #ar))
  end
end

function Session:read_cell()
  local lines = {}
  while true do
    local line = self.rl.readline(">> ")
    if line == nil or line:match("^%s*$") then break end
    self.rl.add_history(line) -- the whole cell comes back with Up, not its first line only
    lines[#lines + 1] = line
  end
  return table.concat(lines, "\n")
end

--- Run a magic line; `body` is a %% magic's cell (read from the prompt when nil).
function Session:magic(line, body)
  local name, args = line:match("^(%%%%?[%w_]+)%s*(.*)$")
  if name == "%px" then
    local ok, opts, code = pcall(parse_px_options, args, true)
    if not ok then self:write(opts, "\n") return end
    self:px(code, opts)
  elseif name == "%%px" then
    local ok, opts, rest = pcall(parse_px_options, args)
    if ok and rest ~= "" then ok, opts = false, string.format("%%%%px: unknown option '%s'", rest) end
    if not ok then
      if not body then self:read_cell() end -- the cell is dropped, not run here
      self:write(opts, "\n")
      return
    end
    self:px(body or self:read_cell(), opts)
  elseif name == "%pxconfig" then
    local ok, err = pcall(function() px.configure(parse_pxconfig(args), self.rc) end)
    if not ok then self:write(tostring(err), "\n") return end
    if not args:match("%S") then self:write(describe_pxconfig(), "\n") end
  elseif name == "%autopx" then
    self.autopx = not self.autopx
    self:write(self.autopx and "%autopx enabled: lines go to the engines\n" or "%autopx disabled\n")
  elseif name == "%pxresult" then
    if not self.last_px then self:write("no non-blocking %px yet\n") return end
    local ok, err = pcall(self.last_px.wait, self.last_px)
    if not ok then px.show_error(err) return end
    self.last_px:display_outputs()
    if not self.last_px:successful() then
      local _, failure = pcall(self.last_px.get, self.last_px)
      px.show_error(failure)
    end
    for _, s in ipairs(self.last_px._slots) do -- the values too, as %px shows them
      if s.ok and s.values and s.values.n > 0 then
        local parts = {}
        for i = 1, s.values.n do parts[i] = show(s.values[i]) end
        self:write(string.format("Out[%d]: %s\n", s.engine, table.concat(parts, "\t")))
      end
    end
  elseif name == "%timeit" or name == "%%timeit" then
    local opts, code = parse_timeit_options(args)
    if name == "%%timeit" then code = body or self:read_cell() end
    local f, err = load(code, "=timeit")
    if not f then self:write(err, "\n") return end
    local ok, terr = pcall(lpar.timeit, f, opts)
    if not ok then self:write(tostring(terr), "\n") end
  elseif name == "%lsmagic" then
    local names = {}
    for k in pairs(MAGICS) do names[#names + 1] = k end
    table.sort(names)
    self:write("Available magics: ", table.concat(names, " "), "\n")
  elseif name == "%help" then
    local names = {}
    for k in pairs(MAGICS) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do self:write(MAGICS[k], "\n") end
    self:write("Lua chunks run here; rc is the Client and dview a blocking view of all engines.\n")
  else
    self:write(string.format("unknown magic %s (%%lsmagic lists them)\n", tostring(name or line)))
  end
end

function Session:lua(first)
  local code = first
  local f, err, expression = load_chunk(code)
  while not f and incomplete(err) do
    local more = self.rl.readline(">> ")
    if more == nil then return end
    self.rl.add_history(more)
    code = code .. "\n" .. more
    f, err, expression = load_chunk(code)
  end
  if not f then
    self:write(err, "\n")
    return
  end
  local results = table.pack(xpcall(f, user_traceback))
  if not results[1] then
    local e = results[2]
    if type(e) == "table" and getmetatable(e) then px.show_error(e) else self:write(tostring(e), "\n") end
    return
  end
  if expression and results.n > 1 then
    local parts = {}
    for i = 2, results.n do parts[#parts + 1] = show(results[i]) end
    self:write(table.concat(parts, "\t"), "\n")
  end
end

function Session:handle(line)
  if line:match("^%s*%%") then
    local stripped = line:match("^%s*(.-)%s*$")
    if self.autopx and stripped == "%autopx" then return self:magic(stripped) end
    return self:magic(stripped)
  end
  if self.autopx then return self:px(line) end
  if line:match("^%s*$") then return end
  return self:lua(line)
end

--- Completion of globals, fields and methods: "rc:vi" -> "rc:view",
-- "math.s" -> ... Names starting with "_" (internals, metamethods) are
-- offered only when asked for; after a call ("rc:view():") nothing is known.
local function completer(word)
  local base, sep, partial = word:match("^(.-)([%.:])([%w_]*)$")
  local t, prefix = _G, ""
  if base then
    if base == "" or base:match("[%.:]$") then return {} end
    for name in base:gmatch("[^%.:]+") do
      t = type(t) == "table" and rawget(t, name) or nil
      if t == nil then return {} end
    end
    prefix = base .. sep
  else
    partial = word
  end
  local out, seen = {}, {}
  local function scan(tbl)
    if type(tbl) ~= "table" then return end
    for k, v in pairs(tbl) do
      if type(k) == "string" and k:sub(1, #partial) == partial and not seen[k]
          and (sep ~= ":" or type(v) == "function")
          and (k:sub(1, 1) ~= "_" or partial:sub(1, 1) == "_") then
        seen[k] = true
        out[#out + 1] = prefix .. k
      end
    end
  end
  scan(t)
  local mt = getmetatable(t)
  if mt and type(mt.__index) == "table" then scan(mt.__index) end
  -- Client and AsyncResult index with a function (rc[0], ar.elapsed); their
  -- methods are in the metatable's `methods`.
  if mt and type(mt.__index) == "function" and type(rawget(mt, "methods")) == "table" then scan(mt.methods) end
  table.sort(out)
  return out
end

--- The banner's BLAS line: which library and kernel the matrices use, and
-- why that kernel (matrix.blas_info); said once here, not by every engine.
local function blas_banner()
  local ok, info, err = pcall(function() return require("lpar.matrix").blas_info() end)
  if not ok or not info then return "BLAS: " .. tostring(ok and err or info) .. "\n" end
  local lines, line = {}, "     "
  for word in info.reason:gmatch("%S+") do
    if #line + #word > 90 then lines[#lines + 1], line = line, "     " end
    line = line .. " " .. word
  end
  lines[#lines + 1] = line
  return string.format("BLAS: %s %s, kernel %s, %d thread%s here\n%s\n", info.vendor, info.version or "",
    info.kernel or "unknown", info.threads, info.threads == 1 and "" or "s", table.concat(lines, "\n"))
end
prompt.blas_banner = blas_banner

function prompt.main(opts)
  local rl = require "lpar.readline"
  local self = setmetatable({ rl = rl }, Session)
  local dir = lpar_dir()
  os.execute("mkdir -p '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null")
  local history = dir .. "/history"
  rl.read_history(history)
  rl.set_completer(completer)
  _G.lpar = lpar
  if opts.rc then -- engines started by `lpar -n N -i script.lua`
    self.rc, self.cluster = opts.rc, opts.cluster
    self:write(string.format("lpar %s: %d engines; rc is the Client, dview a blocking view of all.\n",
      lpar.version, #opts.rc))
  elseif opts.profile then
    local ok, rc = pcall(lpar.Client, { profile = opts.profile })
    if not ok then
      io.stderr:write("lpar: ", tostring(rc), "\n")
      os.exit(1, true)
    end
    self.rc = rc
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
    self:write(string.format("lpar %s: %d engines of cluster %q; rc is the Client, dview a blocking view of all.\n",
      lpar.version, #rc, opts.profile))
  elseif opts.n and opts.n > 0 then
    local cluster = lpar.Cluster { n = opts.n }
    local ok, rc = pcall(cluster.start_and_connect, cluster)
    if not ok then
      io.stderr:write("lpar: ", tostring(rc), "\n")
      return
    end
    self.rc, self.cluster = rc, cluster
    _G.rc, _G.dview = rc, rc:view()
    _G.dview.block = true
    self:write(string.format("lpar %s: %d engines; rc is the Client, dview a blocking view of all.\n",
      lpar.version, #rc))
    self:write(blas_banner())
  else
    self:write(string.format("lpar %s, Lua 5.4 (%%help for the magics; `lpar -n 4` starts engines)\n",
      lpar.version))
  end
  -- Ctrl-C while the prompt waits (get(), wait(), a blocking view call,
  -- %px, %timeit) interrupts the engines' tasks of that call and ends the
  -- wait; the engines keep their state. The tasks are interrupted by the
  -- wait itself, outside this callback, where it may talk to a controller.
  -- At the prompt, Ctrl-C is left to line editing.
  local sigint = uv.new_signal()
  sigint:start("sigint", function()
    if wait.waiting() then
      wait.interrupt()
      self:write("\nKeyboardInterrupt: interrupting the engines\n")
    end
  end)
  while true do
    local line, interrupted = rl.readline(self.autopx and "lpar[px]> " or "lpar> ")
    if line == nil and not interrupted then break end
    line = line or "" -- Ctrl-C at the prompt drops the line, as usual
    if interrupted then self:write("\n") end
    if line:match("%S") then
      rl.add_history(line)
      rl.write_history(history) -- as it goes: a killed prompt keeps its history
    end
    local ok, err = xpcall(self.handle, debug.traceback, self, line)
    if not ok then self:write(tostring(err), "\n") end
    uv.run("nowait") -- serve what arrived meanwhile (timers, late output)
  end
  self:write("\n")
  rl.write_history(history)
  sigint:stop()
  if self.rc then self.rc:close() end
end

prompt.completer = completer
-- Shared with the Jupyter kernel (lpar.kernel), which runs the same magics.
prompt.Session, prompt.MAGICS, prompt.parse_px_options = Session, MAGICS, parse_px_options
prompt.parse_pxconfig, prompt.describe_pxconfig = parse_pxconfig, describe_pxconfig
return prompt
