--- lpar.jupyter: the Jupyter messaging protocol (5.3) over ZeroMQ, on luv's loop.
-- A connection file names five ports on one address; the kernel binds
--   shell (ROUTER)   requests and their replies
--   control (ROUTER) the same, served even while a cell runs (interrupt, shutdown)
--   stdin (ROUTER)   io.read in a cell: input_request, input_reply
--   iopub (PUB)      status, streams, results, display data, errors
--   hb (REP)         an echo, on a thread of its own (lpar.zmq's heartbeat)
-- A message on the wire is [identities..., "<IDS|MSG>", signature, header,
-- parent_header, metadata, content, buffers...], the signature the hex
-- HMAC-SHA256 of the four JSON parts under the connection file's key. A
-- message whose signature does not verify is dropped, logged and counted.
-- Each socket's ZMQ_FD is watched with a luv poll handle; it is
-- edge-triggered, so a socket is drained until empty after every wakeup
-- and after every send on it.
local uv = require "luv"
local cjson = require "cjson"
local zmq = require "lpar.zmq"
local core = require "lpar.core"

local jupyter = {}

-- The process's stderr, for the kernel's log: a cell's io.stderr is its output.
local stderr = io.stderr

jupyter.PROTOCOL_VERSION = "5.3"
local DELIMITER = "<IDS|MSG>"

-- lua-cjson 2.1.0 writes an empty table as {}; a list that may be empty
-- (matches, payload, history) is marked with this value and written as [].
jupyter.EMPTY_LIST = "\1lpar-empty-list\1"
local EMPTY_JSON = '"\\u0001lpar-empty-list\\u0001"'

--- `s` with each byte that is not part of valid UTF-8 replaced by U+FFFD:
-- JSON text is UTF-8, and a cell may print any bytes.
local function valid_utf8(s)
  if utf8.len(s) then return s end
  local out, i = {}, 1
  while i <= #s do
    local ok, bad = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, bad - 1)
    out[#out + 1] = "\u{FFFD}"
    i = bad + 1
  end
  return table.concat(out)
end
jupyter.valid_utf8 = valid_utf8

local function clean(t, depth)
  if depth > 20 then return end
  for k, v in pairs(t) do
    if type(v) == "string" then t[k] = valid_utf8(v)
    elseif type(v) == "table" then clean(v, depth + 1) end
  end
end

--- JSON text of a message part (its strings made valid UTF-8 in place).
function jupyter.encode(value)
  if type(value) == "table" then clean(value, 0) end
  local text = cjson.encode(value)
  if text:find(EMPTY_JSON, 1, true) then text = text:gsub(EMPTY_JSON:gsub("%p", "%%%0"), "[]") end
  -- cjson escapes every "/" as "\/"; JSON does not need it (and only that
  -- escape puts a backslash right before a slash).
  return (text:gsub("\\/", "/"))
end

--- A list, written as [] when empty.
function jupyter.list(t)
  if t == nil or next(t) == nil then return jupyter.EMPTY_LIST end
  return t
end

jupyter.null = cjson.null

--- Read a connection file: {transport, ip, key, signature_scheme, *_port}.
function jupyter.read_connection(path)
  local f, err = io.open(path, "r")
  if not f then error("cannot read the connection file: " .. err, 2) end
  local text = f:read("a")
  f:close()
  local ok, info = pcall(cjson.decode, text)
  if not ok or type(info) ~= "table" then error(path .. " is not a JSON connection file", 2) end
  local scheme = info.signature_scheme or "hmac-sha256"
  if scheme ~= "hmac-sha256" then
    error(string.format("%s: signature scheme %q is not supported (only hmac-sha256)", path, scheme), 2)
  end
  for _, name in ipairs { "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port" } do
    if math.type(math.tointeger(info[name])) ~= "integer" then
      error(string.format("%s: %s is missing", path, name), 2)
    end
  end
  info.transport = info.transport or "tcp"
  info.ip = info.ip or "127.0.0.1"
  info.key = info.key or ""
  return info
end

local function endpoint(info, port)
  if info.transport == "ipc" then return string.format("ipc://%s-%d", info.ip, port) end
  return string.format("tcp://%s:%d", info.ip, math.tointeger(port))
end

local function random_hex(n)
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(n) or tostring(core.now()) .. tostring({})
  if f then f:close() end
  return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end)):sub(1, 2 * n)
end

--- An ISO 8601 time in UTC with microseconds, as message headers carry it.
function jupyter.date(t)
  t = t or core.now()
  local sec = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", sec) .. string.format(".%06dZ", math.floor((t - sec) * 1e6))
end

-- ---- the session: signing, parsing, building messages ----

local Session = {}
Session.__index = Session

function jupyter.Session(key)
  return setmetatable({ key = key or "", id = random_hex(16), count = 0, bad_signatures = 0 },
    Session)
end

function Session:sign(header, parent, metadata, content)
  if self.key == "" then return "" end
  return zmq.hmac_sha256(self.key, header, parent, metadata, content)
end

--- Parse frames into a message, or nil and why (bad signature, malformed).
-- msg: {idents, header, parent_header, metadata, content, buffers, raw_header}
function Session:parse(frames)
  local d
  for i, f in ipairs(frames) do
    if f == DELIMITER then d = i break end
  end
  if not d or #frames < d + 5 then return nil, "malformed message (no delimiter or too few parts)" end
  local sig, h, p, m, c = frames[d + 1], frames[d + 2], frames[d + 3], frames[d + 4], frames[d + 5]
  if self.key ~= "" and not zmq.equal(sig, self:sign(h, p, m, c)) then
    self.bad_signatures = self.bad_signatures + 1
    return nil, "bad signature"
  end
  local ok, header, parent, metadata, content = pcall(function()
    return cjson.decode(h), cjson.decode(p), cjson.decode(m), cjson.decode(c)
  end)
  if not ok or type(header) ~= "table" or type(content) ~= "table" then
    return nil, "malformed message (JSON)"
  end
  local idents, buffers = {}, {}
  for i = 1, d - 1 do idents[i] = frames[i] end
  for i = d + 6, #frames do buffers[#buffers + 1] = frames[i] end
  return { idents = idents, header = header, parent_header = parent, metadata = metadata,
           content = content, buffers = buffers, raw_header = h }
end

--- The frames of a new message of `msg_type`, replying to (or caused by)
-- `parent` (a parsed message, or nil).
function Session:frames(msg_type, content, parent, idents, metadata)
  self.count = self.count + 1
  local header = jupyter.encode {
    msg_id = self.id .. "_" .. self.count, session = self.id, username = "lpar",
    date = jupyter.date(), msg_type = msg_type, version = jupyter.PROTOCOL_VERSION,
  }
  local parent_text = parent and parent.raw_header or "{}"
  local meta = metadata and jupyter.encode(metadata) or "{}"
  local body = jupyter.encode(content)
  local frames = {}
  for _, id in ipairs(idents or {}) do frames[#frames + 1] = id end
  frames[#frames + 1] = DELIMITER
  frames[#frames + 1] = self:sign(header, parent_text, meta, body)
  frames[#frames + 1] = header
  frames[#frames + 1] = parent_text
  frames[#frames + 1] = meta
  frames[#frames + 1] = body
  return frames
end

-- ---- channels: a socket on the loop ----

local Channel = {}
Channel.__index = Channel

--- Bind a socket of `type` at `address`; `on_message(frames)` is called for
-- each message that arrives (nil for a socket that only sends).
-- `key`: the control channel, read by lpar.zmq's relay thread (which stops
-- a busy cell when an interrupt or shutdown request comes).
local function channel(ctx, type, address, on_message, name, key)
  local sock, err
  if key then
    sock, err = ctx:control_relay(address, key)
    if not sock then error(string.format("cannot bind the %s socket to %s: %s", name, address, err), 0) end
  else
    sock, err = ctx:socket(type)
    if not sock then error(err, 0) end
    local bound, berr = sock:bind(address)
    if not bound then error(string.format("cannot bind the %s socket to %s: %s", name, address, berr), 0) end
  end
  local self = setmetatable({ sock = sock, on_message = on_message, name = name }, Channel)
  if on_message then
    self.poll = uv.new_poll(assert(sock:fd()))
    self.poll:start("r", function() self:drain() end)
  end
  return self
end

--- Receive until the socket has nothing left (ZMQ_FD is edge-triggered).
-- Re-entrant calls (a handler that sends) only ask for another pass.
function Channel:drain()
  if not self.on_message or self.closed then return end
  if self.draining then self.again = true return end
  self.draining = true
  repeat
    self.again = false
    while not self.closed and self.sock:readable() do
      local frames, err = self.sock:recv()
      if frames == nil then
        stderr:write(string.format("lpar kernel: %s socket: %s\n", self.name, err))
        break
      end
      if not frames then break end
      local ok, herr = xpcall(self.on_message, debug.traceback, frames)
      if not ok then stderr:write("lpar kernel: ", tostring(herr), "\n") end
    end
  until not self.again or self.closed
  self.draining = false
end

function Channel:send(frames)
  if self.closed then return nil, "closed" end
  local ok, err = self.sock:send(frames)
  if not ok then stderr:write(string.format("lpar kernel: %s socket: %s\n", self.name, err)) end
  self:drain() -- a send can consume the edge of a message that arrived meanwhile
  return ok, err
end

function Channel:close()
  if self.closed then return end
  self.closed = true
  if self.poll then
    -- Stopped and unref'd, not closed: luv 1.44 crashes at exit on a half-closed handle.
    self.poll:stop()
    self.poll:unref()
  end
  self.sock:close()
end

--- Open every channel of a connection file. `handlers`: shell(msg),
-- control(msg), stdin(msg), each with a parsed message; `log(text)`.
-- Returns {session, shell, control, stdin, iopub, ctx, info}.
function jupyter.open(path, handlers)
  local info = jupyter.read_connection(path)
  local session = jupyter.Session(info.key)
  local ctx = assert(zmq.context())
  local conn = { session = session, ctx = ctx, info = info }
  local function receiver(name)
    local handle = handlers[name]
    return function(frames)
      local msg, why = session:parse(frames)
      if not msg then
        handlers.log(string.format("dropped a message on %s: %s", name, why))
        return
      end
      msg.channel = name
      handle(msg)
    end
  end
  conn.iopub = channel(ctx, "PUB", endpoint(info, info.iopub_port), nil, "iopub")
  conn.shell = channel(ctx, "ROUTER", endpoint(info, info.shell_port), receiver("shell"), "shell")
  conn.control = channel(ctx, "ROUTER", endpoint(info, info.control_port), receiver("control"), "control",
    info.key)
  conn.stdin = channel(ctx, "ROUTER", endpoint(info, info.stdin_port), receiver("stdin"), "stdin")
  local hb, err = ctx:heartbeat(endpoint(info, info.hb_port))
  if not hb then error("cannot start the heartbeat: " .. err, 0) end
  -- What arrived before the poll handles started is read now.
  for _, name in ipairs { "shell", "control", "stdin" } do conn[name]:drain() end
  return conn
end

--- Reply to `msg` on the channel it came on.
function jupyter.reply(conn, msg, msg_type, content)
  return conn[msg.channel]:send(conn.session:frames(msg_type, content, msg, msg.idents))
end

--- Send on `channel` to the frontend that sent `msg` (an input_request on
-- stdin goes to the identity of the shell request that asked for it).
function jupyter.reply_on(conn, name, msg, msg_type, content)
  return conn[name]:send(conn.session:frames(msg_type, content, msg, msg.idents))
end

--- Publish on iopub, caused by `parent`.
function jupyter.publish(conn, msg_type, content, parent)
  return conn.iopub:send(conn.session:frames(msg_type, content, parent, { "kernel." .. msg_type }))
end

function jupyter.close(conn)
  for _, name in ipairs { "shell", "control", "stdin", "iopub" } do conn[name]:close() end
  conn.ctx:term()
end

return jupyter
