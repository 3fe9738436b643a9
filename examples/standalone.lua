-- A standalone cluster: started once, used by one client after another.
--   ./build/lpar examples/standalone.lua [PROFILE]
-- The same as `lpar cluster start -n 2 --daemonize --profile PROFILE`, then
-- `lpar.Client{profile = PROFILE}` from any script or prompt, then
-- `lpar cluster stop --profile PROFILE`. See docs/standalone.md.
local lpar = require "lpar"

local name = arg[1] or "example"
local cluster = lpar.Cluster { n = 2, profile = name }
cluster:start()
print(string.format("started %s", tostring(cluster)))

-- A first client sets a variable on the engines and goes away.
do
  local rc <close> = lpar.Client { profile = name }
  rc:view():execute("greeting = 'set by the first client on engine ' .. lpar.engine.id", { block = true })
end

-- The next one finds it: the engines outlived the first client.
local rc = lpar.Client { profile = name }
for _, g in ipairs(rc:view():pull("greeting", { block = true })) do print(g) end

-- Two clients at once each get their own results.
local other = lpar.Client { profile = name }
local mine = rc[0]:apply(function(x) return x + 1 end, 1)
local theirs = other[0]:apply(function(x) return x * 10 end, 1)
print("results:", mine:get(), theirs:get())

local status = rc:queue_status()
print(string.format("clients %d, messages refused %d", status.clients, status.refused))
other:close()

rc:shutdown() -- stop the cluster on purpose (cluster:stop() does the same)
print("stopped")
