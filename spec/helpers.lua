--- Shared fixtures for the specs.
local uv = require "luv"

local helpers = {}

--- Is process `pid` alive (and not a zombie)?
helpers.alive = require("lpar.profile").alive

--- Run the loop (serving lpar events) until pred() or `timeout` seconds.
function helpers.wait_until(pred, timeout)
  local deadline = uv.hrtime() + (timeout or 5) * 1e9
  local timer = uv.new_timer()
  timer:start(5, 5, function() end)
  while not pred() and uv.hrtime() < deadline do uv.run("once") end
  helpers.close(timer)
  return pred()
end

--- Close a luv handle and let the loop finish closing it: luv 1.44 crashes
-- at exit if a handle is left half-closed.
function helpers.close(handle)
  handle:close()
  uv.run("nowait")
end

--- Poll plain time (no loop) until pred() or timeout.
function helpers.poll(pred, timeout)
  local deadline = uv.hrtime() + (timeout or 5) * 1e9
  while not pred() and uv.hrtime() < deadline do uv.sleep(5) end
  return pred()
end

--- Path of the build's lpar command: ./build's, or LPAR_TEST_BUILD's (the
-- sanitized build the specs also run against, scripts/test_sanitized).
helpers.build = os.getenv("LPAR_TEST_BUILD") or "build"
helpers.lpar = "./" .. helpers.build .. "/lpar"
--- Whether the specs run against the sanitized build (its engines are
-- several times slower to start and to exit: LeakSanitizer checks at exit).
helpers.sanitized = helpers.build ~= "build"

--- Run a shell command; returns its stdout and exit code.
function helpers.run(cmd)
  local p = io.popen(cmd .. "; echo \"::$?\"")
  local out = p:read("a")
  p:close()
  local body, code = out:match("^(.-)::(%d+)\n?$")
  return body, tonumber(code)
end

--- A file's contents, or nil.
function helpers.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

--- Standalone clusters in a scratch LPAR_DIR of their own, for a spec file:
-- `setup()` and `teardown()` to call from busted's, `sh(cmd)` with LPAR_DIR
-- set, `start(name, args)` (`lpar cluster start --daemonize`), and the
-- profile's `conn_file(name)`, `controller_pid(name)` and `key(name)` (raw).
function helpers.scratch_clusters()
  local c = { base = os.tmpname() }
  os.remove(c.base)
  function c.sh(cmd) return helpers.run("LPAR_DIR='" .. c.base .. "' " .. cmd) end
  function c.conn_file(name) return c.base .. "/profile_" .. name .. "/connection.json" end
  function c.start(name, extra)
    local out, code = c.sh(string.format("%s cluster start --daemonize --profile %s %s 2>&1",
      helpers.lpar, name, extra or ""))
    assert(code == 0, out)
    return out
  end
  function c.controller_pid(name)
    return math.tointeger(tonumber(helpers.read_file(c.conn_file(name)):match('"pid":(%d+)')))
  end
  function c.key(name)
    return (helpers.read_file(c.conn_file(name)):match('"key":"(%x+)"'):gsub("%x%x", function(h)
      return string.char(tonumber(h, 16)) end))
  end
  function c.setup() uv.os_setenv("LPAR_DIR", c.base) end
  function c.teardown()
    c.sh(helpers.lpar .. " cluster stop --all")
    uv.os_unsetenv("LPAR_DIR")
    os.execute("rm -rf '" .. c.base .. "'")
  end
  return c
end

return helpers
