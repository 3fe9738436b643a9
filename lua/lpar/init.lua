--- lpar: interactive parallel computing for Lua 5.4.
--   local lpar = require "lpar"
--   local rc <close> = lpar.Cluster{n = 4}:start_and_connect()
--   local dview = rc:view()
--   dview:execute("x = 1", {block = true})
local core = require "lpar.core"
local errors = require "lpar.errors"

local lpar = {
  version = core.version,
  --- Engines started and owned by this process: `lpar.Cluster{n = 4}`
  -- (see lpar.cluster for the options and methods).
  Cluster = require("lpar.cluster").new,
  --- A Client on a running standalone cluster: `lpar.Client{profile = "default"}`
  -- or `{connection_file = path}` (see lpar.client).
  Client = require("lpar.client").connect,
  errors = errors,
  RemoteError = errors.RemoteError,
  EngineError = errors.EngineError,
  CompositeError = errors.CompositeError,
  TimeoutError = errors.TimeoutError,
  TaskError = errors.TaskError,
  -- On an engine, the engine's own id and cluster size.
  engine = package.loaded["lpar.engine"],
}

--- Register a metatable under a name, so values carrying it can be sent
-- (the receiver must register the same name).
function lpar.register_metatable(name, mt)
  if type(name) ~= "string" then error("register_metatable: name must be a string", 2) end
  if type(mt) ~= "table" then error("register_metatable: expected a metatable", 2) end
  core.register_metatable(name, mt)
  return mt
end

--- Time `f` as IPython's %timeit does and print "N loops, best of R: T per
-- loop"; opts: number (loops, default chosen for about 0.2 s), rep (default
-- 3), quiet. Returns the figures.
lpar.timeit = require("lpar.timeit").timeit

--- Run code on the active view (the last activated, or all engines of the
-- latest client) and show the output labelled by engine. opts: targets,
-- block (default true), locally (also run it here), verbose (say where).
function lpar.px(code, opts)
  if type(code) ~= "string" then error("px: code must be a string", 2) end
  require("lpar.options").check("px", opts,
    { targets = true, block = true, locally = true, group_outputs = true, out = true, timeout = true,
      verbose = true })
  return require("lpar.px").run(code, opts)
end

--- Encode values as bytes, as they travel to engines: `lpar.encode(...)`.
lpar.encode = core.encode
--- Decode bytes from lpar.encode back into the values: `lpar.decode(bytes)`.
lpar.decode = core.decode

return lpar
