--- Profiles: where a standalone cluster keeps its socket and connection file.
--   $LPAR_DIR (default ~/.lpar)/profile_NAME/    mode 0700
--     connection.json  mode 0600: socket path, key, pid, ... (a flat JSON object,
--                      as ipyparallel's, so other tools can read it)
--     controller.sock  the controller's unix socket, mode 0600
--     controller.log   what a daemonized controller printed
-- The connection file holds the cluster's key: whoever can read it can run
-- code as this user, so it is made 0600 inside a 0700 directory and a file
-- that others can read is refused.
local uv = require "luv"
local json = require "dkjson"

local profile = {}

local DIR_MODE, FILE_MODE = tonumber("700", 8), tonumber("600", 8)
profile.CONNECTION_FILE = "connection.json"

function profile.base()
  local dir = os.getenv("LPAR_DIR")
  if dir and dir ~= "" then return dir end
  local home = os.getenv("HOME")
  if not home or home == "" then error("neither LPAR_DIR nor HOME is set: no place for profiles", 0) end
  return home .. "/.lpar"
end

function profile.check_name(name)
  if type(name) ~= "string" or not name:match("^[%w_.-]+$") or name:match("^%.") then
    error(string.format("bad profile name %q: use letters, digits, '_', '-' and '.'", tostring(name)), 0)
  end
  return name
end

function profile.dir(name)
  return profile.base() .. "/profile_" .. profile.check_name(name)
end

function profile.connection_file(name)
  return profile.dir(name) .. "/" .. profile.CONNECTION_FILE
end

--- Make directory `path` with mode 0700 if it is missing. An existing one
-- is made 0700 only when `tighten` (a profile directory, which is ours); the
-- base may be a directory the user chose and shares, such as /tmp.
local function mkdir_private(path, tighten)
  local ok, err, code = uv.fs_mkdir(path, DIR_MODE)
  if not ok and code ~= "EEXIST" then error(string.format("cannot create %s: %s", path, err), 0) end
  local st = assert(uv.fs_stat(path))
  if st.type ~= "directory" then error(path .. " exists and is not a directory", 0) end
  if not tighten then return end
  if st.uid ~= uv.getuid() then
    error(string.format("%s belongs to another user (uid %d): it cannot hold this user's cluster key",
      path, st.uid), 0)
  end
  if st.mode % 512 ~= DIR_MODE then assert(uv.fs_chmod(path, DIR_MODE)) end
end

--- Create the profile's directory (and the base if missing), mode 0700; its path.
function profile.ensure_dir(name)
  mkdir_private(profile.base(), false)
  local dir = profile.dir(name)
  mkdir_private(dir, true)
  return dir
end

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function unhex(s)
  if type(s) ~= "string" or #s ~= 64 or s:find("[^%x]") then return nil end
  return (s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end))
end

local FIELDS = { "profile", "socket", "ip", "port", "pid", "engines", "started" }

--- The connection file's text for `info` (profile, socket, ip, port, pid,
-- engines, started, key of 32 bytes): what profile.write writes, and what a
-- launcher hands an engine on another host on its standard input. JSON, one
-- field a line, the key last: {"profile":"default", ..., "key":"<64 hex digits>"}
function profile.format(info)
  local t, order = {}, {}
  for _, k in ipairs(FIELDS) do
    local v = info[k]
    if math.type(v) == "float" and math.tointeger(v) then v = math.tointeger(v) end
    if math.type(v) == "float" then v = math.floor(v * 1000 + 0.5) / 1000 end
    if v ~= nil then
      t[k] = v
      order[#order + 1] = k
    end
  end
  t.key = hex(info.key)
  order[#order + 1] = "key"
  local lines = { "{" }
  for i, k in ipairs(order) do
    lines[#lines + 1] = string.format("  %s:%s%s", json.encode(k), json.encode(t[k]), i < #order and "," or "")
  end
  lines[#lines + 1] = "}\n"
  return table.concat(lines, "\n")
end

--- Write the connection file atomically, mode 0600 from the first byte.
-- info: as profile.format takes.
function profile.write(path, info)
  local tmp = path .. ".tmp"
  os.remove(tmp)
  local fd, err = uv.fs_open(tmp, "wx", FILE_MODE)
  if not fd then error(string.format("cannot write %s: %s", tmp, err), 0) end
  assert(uv.fs_write(fd, profile.format(info)))
  uv.fs_fsync(fd)
  uv.fs_close(fd)
  local ok, rerr = os.rename(tmp, path)
  if not ok then error(string.format("cannot write %s: %s", path, rerr), 0) end
end

--- The fields of a connection file's `text` (from `where`: a path, or
-- "standard input"), key decoded; raises naming `where` when it is not one.
function profile.parse(text, where)
  local info = json.decode(text, 1, nil)
  local key = type(info) == "table" and unhex(info.key)
  if not key or (type(info.socket) ~= "string" and math.type(info.port) ~= "integer") then
    error(string.format("%s is not an lpar connection file (it should hold a socket path or a " ..
      "port, and a 64-digit hex key); remove it, or restart its cluster", where), 0)
  end
  info.key = key
  info.file = where
  info.pid = math.tointeger(info.pid)
  info.port = math.tointeger(info.port)
  return info
end

--- Read a connection file: its fields, key decoded. Raises an error that
-- names the file and says what to do; `name` (a profile) improves it.
function profile.read(path, name)
  local st, _, code = uv.fs_stat(path)
  if not st then
    if code == "ENOENT" then
      if name then
        error(string.format("no cluster with profile %q: %s does not exist; start one with " ..
          "`lpar cluster start --profile %s` (or set LPAR_DIR if it runs elsewhere)", name, path, name), 0)
      end
      error(string.format("connection file %s does not exist; `lpar cluster list` shows the " ..
        "running clusters and their files", path), 0)
    end
    error(string.format("cannot read connection file %s: %s", path, code), 0)
  end
  if st.mode % 64 ~= 0 then
    error(string.format("connection file %s can be read by other users (mode %o): it holds the " ..
      "cluster's key; `chmod 600 %s` and restart the cluster, since the key may be known", path,
      st.mode % 512, path), 0)
  end
  local f, err = io.open(path, "r")
  if not f then error(string.format("cannot read connection file %s: %s", path, err), 0) end
  local text = f:read("a")
  f:close()
  return profile.parse(text, path)
end

--- True when process `pid` is alive (a zombie is not).
function profile.alive(pid)
  pid = math.tointeger(pid)
  if not pid or pid <= 0 then return false end
  local f, _, errno = io.open("/proc/" .. pid .. "/stat", "r")
  -- EMFILE/ENFILE (24, 23): this process cannot look; a signal 0 still tells (a zombie counts as alive).
  if not f and (errno == 24 or errno == 23) then return (uv.kill(pid, 0)) == 0 end
  if not f then return false end
  local stat = f:read("a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

--- The profiles under the base directory that have a connection file: names.
function profile.list()
  local names = {}
  local req = uv.fs_scandir(profile.base())
  while req do
    local entry = uv.fs_scandir_next(req)
    if not entry then break end
    local name = entry:match("^profile_(.+)$")
    if name and uv.fs_stat(profile.connection_file(name)) then names[#names + 1] = name end
  end
  table.sort(names)
  return names
end

--- Remove a dead cluster's files: connection file and socket. Returns them.
function profile.remove_files(name)
  local removed = {}
  local dir = profile.dir(name)
  for _, f in ipairs { profile.CONNECTION_FILE, "controller.sock" } do
    if os.remove(dir .. "/" .. f) then removed[#removed + 1] = dir .. "/" .. f end
  end
  return removed
end

profile.hex = hex

return profile
