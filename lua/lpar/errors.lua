--- Error objects raised by AsyncResult:get() and the views.
-- Each is a table with `__tostring`, so `print(err)` reads well and code can
-- look at the fields: `err.engine`, `err.message`, `err.traceback`.
local errors = {}

local function class(name)
  local c = { name = name }
  c.__index = c
  c.__name = name
  return c
end

--- A Lua error raised by user code on an engine.
errors.RemoteError = class("RemoteError")
function errors.RemoteError.new(engine, kind, err, task)
  return setmetatable({
    engine = engine,
    kind = kind,
    task = task,
    message = err and err.message or "unknown error",
    traceback = err and err.traceback,
  }, errors.RemoteError)
end
function errors.RemoteError:__tostring()
  -- No engine: it failed here, as it was sent.
  local head = string.format("[%s:%s] %s", self.engine or "client", self.kind, self.message)
  if self.traceback then head = head .. "\n" .. self.traceback end
  return head
end

--- An engine that died, or was stopped, while a task of ours was on it
-- (engine nil: a load-balanced task still waiting in the controller for
-- one, when every engine went).
errors.EngineError = class("EngineError")
function errors.EngineError.new(engine, task, how)
  return setmetatable({ engine = engine, task = task, message = how }, errors.EngineError)
end
function errors.EngineError:__tostring()
  if not self.engine then
    return string.format("EngineError: %severy engine %s",
      self.task and string.format("task %d waited in the controller for an engine, and ", self.task) or "",
      self.message)
  end
  if self.task then
    return string.format("EngineError: engine %d %s while running task %d", self.engine,
      self.message, self.task)
  end
  return string.format("EngineError: engine %d %s", self.engine, self.message)
end

--- Several failures of one AsyncResult, in target order.
errors.CompositeError = class("CompositeError")
function errors.CompositeError.new(list)
  return setmetatable({ errors = list, message = #list .. " engines failed" }, errors.CompositeError)
end
function errors.CompositeError:__tostring()
  local parts = { string.format("CompositeError: %d of the engines failed", #self.errors) }
  for _, e in ipairs(self.errors) do parts[#parts + 1] = tostring(e) end
  return table.concat(parts, "\n")
end

--- get(timeout) or wait ran out of time; the result is still pending.
errors.TimeoutError = class("TimeoutError")
function errors.TimeoutError.new(what)
  return setmetatable({ message = what }, errors.TimeoutError)
end
function errors.TimeoutError:__tostring() return "TimeoutError: " .. self.message end

--- A load-balanced task that did not run to the end: aborted while queued,
-- timed out, or whose dependency failed. `reason` says which.
errors.TaskError = class("TaskError")
function errors.TaskError.new(reason, message, task, engine)
  return setmetatable({ reason = reason, message = message, task = task, engine = engine },
    errors.TaskError)
end
function errors.TaskError:__tostring()
  local where = ""
  if self.engine and self.task then where = string.format(" [engine %d, task %d]", self.engine, self.task)
  elseif self.engine then where = string.format(" [engine %d]", self.engine) end
  return string.format("TaskError (%s)%s: %s", self.reason, where, self.message)
end

return errors
