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

--- Path of the build's lpar command.
helpers.lpar = "./build/lpar"

--- Run a shell command; returns its stdout and exit code.
function helpers.run(cmd)
  local p = io.popen(cmd .. "; echo \"::$?\"")
  local out = p:read("a")
  p:close()
  local body, code = out:match("^(.-)::(%d+)\n?$")
  return body, tonumber(code)
end

return helpers
