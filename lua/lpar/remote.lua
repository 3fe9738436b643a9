--- Reaching a standalone cluster from its connection file: a Hub over the
-- controller's unix socket when it can be reached from here, else over its
-- TCP address; and one-off control calls for `lpar cluster stop/list`.
local uv = require "luv"
local Hub = require "lpar.hub"
local profile = require "lpar.profile"
local wait = require "lpar.wait"

local remote = {}

local RESOLVE_TIMEOUT = 5

--- A numeric address for `host`, resolved on the loop (never blocking it).
local function numeric(host)
  if host:match("^[%d.]+$") or host:find(":", 1, true) or host == "localhost" then return host end
  local done, addr, why = false, nil, nil
  uv.getaddrinfo(host, nil, { socktype = "stream" }, function(err, res)
    done = true
    if err or not res or not res[1] then why = err or "no address" else addr = res[1].addr end
  end)
  wait.until_done(function() return done end, RESOLVE_TIMEOUT)
  if not addr then return nil, string.format("cannot resolve %s: %s", host, why or "timed out") end
  return addr
end

--- Try the addresses of the controller `info` names, its unix socket first:
-- `try(address)` returns a result, or nil and why. The first result, or nil
-- and what was tried.
function remote.first_reachable(info, try)
  local tried = {}
  local function attempt(address)
    local result, extra = try(address)
    if result then return result, extra end
    tried[#tried + 1] = extra
  end
  if info.socket then
    local result, extra = attempt { path = info.socket }
    if result then return result, extra end
  end
  if info.port then
    local host, err = numeric(info.ip or "127.0.0.1")
    if not host then
      tried[#tried + 1] = err
    else
      local result, extra = attempt { host = host, port = info.port }
      if result then return result, extra end
    end
  end
  return nil, table.concat(tried, "; ")
end

--- A connected Hub for the controller `info` names, and its answer to
-- "connect"; or nil and what was tried.
function remote.open(info, fields)
  return remote.first_reachable(info, function(address)
    local hub, err = Hub.connect(address, info.key, fields)
    if not hub then return nil, err end
    local hello, why = hub:call("connect")
    if hello then return hub, hello end
    hub:stop()
    return nil, why
  end)
end

--- One control operation on the controller `info` names, over a connection
-- of its own: the answer's values, or nil and a message.
function remote.ask(info, op, ...)
  local hub, err = remote.open(info)
  if not hub then return nil, err end
  local result = table.pack(hub:call(op, ...))
  hub:stop()
  return table.unpack(result, 1, result.n)
end

--- Connect to a running standalone cluster. opts: profile (default
-- "default") or connection_file. Raises a message saying which file and
-- what to do when it cannot.
function remote.connect(opts)
  local name = opts.profile or (not opts.connection_file and "default") or nil
  local path = opts.connection_file or profile.connection_file(name)
  -- With this process's descriptor table full, every step below fails its
  -- own confusing way (a "stale" file, a lost connection): say what it is.
  local probe, _, code = uv.fs_open("/dev/null", "r", 0)
  if probe then
    uv.fs_close(probe)
  elseif code == "EMFILE" or code == "ENFILE" then
    error(string.format("cannot connect to the cluster in %s: %s (%s): close some files or raise " ..
      "the limit (ulimit -n)", path, code == "EMFILE" and "this process has too many open files" or
      "the system has too many open files", code), 0)
  end
  local info = profile.read(path, not opts.connection_file and name or nil)
  local hub, hello = remote.open(info, { info = info })
  if not hub then
    local who = name and string.format("the cluster of profile %q", name) or "the cluster in " .. path
    if info.pid and not profile.alive(info.pid) then
      error(string.format("%s is not running (its controller, pid %d, is gone), so %s is stale; " ..
        "start it again with `lpar cluster start%s`, or remove stale files with `lpar cluster clean`",
        who, info.pid, path, name and (" --profile " .. name) or ""), 0)
    end
    error(string.format("cannot connect to %s (%s): %s", who, path, hello), 0)
  end
  hub.cluster_info = hello
  return hub
end

return remote
