--- LoadBalancedView: tasks go to whichever engine is least loaded.
--   local lb = rc:load_balanced_view()
--   lb:map(f, list, {chunksize = 10, ordered = false})
-- Dispatch is pipelined: each engine holds up to `queue_depth` tasks (a view
-- flag, default 2), so it never waits a round trip between tasks; the rest
-- wait here, in the client, in submission order.
-- Flags (fields, or per call through view:with{}): block, timeout (seconds
-- from submission: a task still queued here fails without running; one
-- handed to an engine is interrupted if running, and fails as timed out
-- either way), retries (run again elsewhere after a failure or an engine's
-- death), after (results that must be done first), follow (run where those
-- ran), scheme ("least" by default, "lru", "random"), queue_depth.
local core = require "lpar.core"
local errors = require "lpar.errors"
local viewflags = require "lpar.viewflags"
local AsyncResult = require "lpar.asyncresult"
local wait = require "lpar.wait"

local APPLY = core.APPLY

-- Seconds a task waits when no engine it may run on is up (or starting),
-- before it fails: restart_engines within that time brings them back in
-- time, and nothing waits forever on engines that never come back.
local STRANDED_GRACE = 3

-- The scheduler: one per connection (hub), shared by its balanced views.

local Scheduler = {}
Scheduler.__index = Scheduler

local function scheduler_of(hub)
  local s = hub.scheduler
  if s then return s end
  s = setmetatable({ hub = hub, head = 1, tail = 0, queue = {}, held = {}, load = {},
                     last = {}, tick = 0, grace = STRANDED_GRACE }, Scheduler)
  hub.scheduler = s
  -- An engine that comes up (or goes) changes where tasks can go.
  hub.on_ready[#hub.on_ready + 1] = function() s:dispatch() end
  return s
end

local Task = {}
Task.__index = Task

local function deps_state(list)
  if not list then return "ready" end
  for _, ar in ipairs(list) do
    if not ar:ready() then return "waiting" end
    if not ar:successful() then return "failed" end
  end
  return "ready"
end

--- Engines a task may go to now, given its targets, follow and exclusions.
local function candidates(self, task, ids)
  if not (task.targets or task.follow or task.excluded) then -- the common case, cheaply
    local out = {}
    for _, id in ipairs(ids) do
      if (self.load[id] or 0) < task.depth then out[#out + 1] = id end
    end
    return out
  end
  local allowed = {}
  for _, id in ipairs(task.targets or ids) do allowed[id] = true end
  for _, ar in ipairs(task.follow or {}) do
    local ran = {}
    for _, id in ipairs(ar.engine_ids) do ran[id] = true end
    for id in pairs(allowed) do
      if not ran[id] then allowed[id] = nil end
    end
  end
  local out, fallback = {}, {}
  for _, id in ipairs(ids) do
    if allowed[id] and (self.load[id] or 0) < task.depth then
      if task.excluded and task.excluded[id] then fallback[#fallback + 1] = id
      else out[#out + 1] = id end
    end
  end
  if #out == 0 then out = fallback end
  return out
end

--- Is some engine that `task` may run on up or starting, busy or not?
local function has_live_engine(self, task)
  local hub = self.hub
  for _, id in ipairs(task.targets or hub:all_ids()) do
    local st = hub:engine_state(id)
    if st == "ready" or st == "starting" then
      local ok = true
      for _, ar in ipairs(task.follow or {}) do
        local ran = false
        for _, e in ipairs(ar.engine_ids) do ran = ran or e == id end
        ok = ok and ran
      end
      if ok then return true end
    end
  end
  return false
end

local function pick(self, task, ids)
  local c = candidates(self, task, ids)
  if #c == 0 then return nil end
  if task.scheme == "random" then return c[math.random(#c)] end
  local best
  for _, id in ipairs(c) do
    if best == nil then
      best = id
    else
      local lb, li = self.load[best] or 0, self.load[id] or 0
      local older = (self.last[id] or 0) < (self.last[best] or 0)
      if task.scheme == "lru" then
        if older then best = id end
      elseif li < lb or (li == lb and older) then
        best = id
      end
    end
  end
  return best
end

--- Fail a task that will not run (aborted, timed out in the queue, or a
-- dependency failed).
function Task:fail(err)
  if self.done then return end
  self.done = true
  if self.timer then wait.release_timer(self.timer) end
  self.timer = nil
  self.slot.task = nil
  self.ar:_settle(self.slot, false, nil, nil, err)
end

--- Send `task` to `engine`: "sent", "failed" (it cannot be sent anywhere,
-- and is failed), or "gone" (the engine is gone: the task is untouched).
function Scheduler:send(task, engine)
  local rec = { ar = task, kind = task.slot.kind } -- the one shape of a request record
  local ok, err = self.hub:submit(engine, APPLY, "args", rec, task.f,
    table.unpack(task.args, 1, task.args.n))
  if not ok then
    if type(err) == "string" then
      task:fail(errors.RemoteError.new(engine, "apply", { message = err }))
      return "failed"
    end
    return "gone"
  end
  task.engine, task.id, task.running = engine, rec.id, true
  task.slot.engine = engine
  self.load[engine] = (self.load[engine] or 0) + 1
  self.tick = self.tick + 1
  self.last[engine] = self.tick
  return "sent"
end

--- A task that could not be placed: true when it is failed because no
-- engine it may run on has been up for the grace period; else it waits,
-- with a timer to look again when its grace runs out.
function Scheduler:stranded(task, now)
  if has_live_engine(self, task) then
    task.stranded_since = nil
    return false
  end
  now = now or core.now()
  task.stranded_since = task.stranded_since or now
  local left = task.stranded_since + self.grace - now
  if left <= 0 then
    task:fail(errors.TaskError.new("no engine", string.format(
      "no engine it may run on was up for %gs%s", self.grace,
      task.last_error and ("; its last attempt: " .. tostring(task.last_error)) or ""), nil))
    return true
  end
  if not self.strand_timer then
    self.strand_timer = wait.acquire_timer(left, function()
      self.strand_timer = nil
      self:dispatch()
    end, true)
  end
  return false
end

--- The engines up that answer their heartbeats: a stopped or wedged one
-- gets no task (its queue would wait). While one is left out and work
-- waits, look again soon, for it may be back.
function Scheduler:responsive_ids()
  local hub = self.hub
  local ids = hub:ids_shared()
  if hub.controller then return ids end
  local out
  for i, id in ipairs(ids) do
    if hub:not_responding(id) then
      if not out then out = table.move(ids, 1, i - 1, 1, {}) end
    elseif out then
      out[#out + 1] = id
    end
  end
  if out and not self.recheck_timer and (self.head <= self.tail or #self.held > 0) then
    self.recheck_timer = wait.acquire_timer(2 * core.HEARTBEAT_MS / 1000, function()
      self.recheck_timer = nil
      self:dispatch()
    end)
  end
  return out or ids
end

--- Place queued tasks on engines with room, in submission order.
function Scheduler:dispatch()
  if self.dispatching then return end
  self.dispatching = true
  local ids = self:responsive_ids()
  -- Tasks held back by dependencies or placement go first once free.
  local still = {}
  for _, task in ipairs(self.held) do
    if not task.done and not self:place(task, ids) and not self:stranded(task) then
      still[#still + 1] = task
    end
  end
  self.held = still
  while self.head <= self.tail do
    local task = self.queue[self.head]
    if not task.done and not self:place(task, ids, true) and not self:stranded(task) then break end
    self.queue[self.head] = nil
    self.head = self.head + 1
  end
  if self.head > self.tail and self.tail > 1024 then
    -- A drained table keeps its array: start a fresh one so memory stays flat.
    self.queue, self.head, self.tail = {}, 1, 0
  end
  self.dispatching = false
end

--- Try to run `task` now. True when it is dealt with (sent or failed, or
-- moved to the held list when `from_queue`), false to keep it where it is.
function Scheduler:place(task, ids, from_queue)
  local deps = deps_state(task.after)
  if deps == "failed" then
    task:fail(errors.TaskError.new("dependency", "a task it depends on failed", nil))
    return true
  end
  if deps == "waiting" or deps_state(task.follow) == "waiting" then
    if from_queue then self.held[#self.held + 1] = task end
    return from_queue
  end
  while true do
    local engine = pick(self, task, ids)
    if engine == nil then
      -- No room anywhere it may go. A constrained task steps aside so the
      -- tasks behind it can use the engines it cannot.
      if from_queue and (task.targets or task.follow) then
        self.held[#self.held + 1] = task
        return true
      end
      return false
    end
    if self:send(task, engine) ~= "gone" then return true end
    -- That engine's link closed under us: it is no longer among the ids.
    ids = self:responsive_ids()
  end
end

--- Queue `task` and place what can go; with `later`, only queue it (a map
-- queues all its chunks, then dispatches once: a dispatch per chunk made
-- submitting 3,000 chunks take 40 ms in which the loop saw no event, an
-- engine's death included).
function Scheduler:enqueue(task, later)
  self.tail = self.tail + 1
  self.queue[self.tail] = task
  if not later then self:dispatch() end
end

-- A task is the record the hub settles; it forwards to its AsyncResult slot.

function Task:_stream(_, name, text) self.ar:_stream(self.slot, name, text) end
function Task:_display(_, output) self.ar:_display(self.slot, output) end

--- Ctrl-C while waiting on `ar`: its running tasks are interrupted (and
-- not retried), its queued ones fail without running.
local function interrupt_tasks(ar)
  ar._interrupting = true
  for _, s in ipairs(ar._slots) do
    local task = not s.done and s.task
    if task and not task.done then
      task.retries = 0
      if task.running then
        task.sched.hub:interrupt_task(task.engine, task.id)
      else
        task:fail(errors.TaskError.new("aborted", "interrupted before it ran", nil))
      end
    end
  end
end

function Task:_settle(rec, ok, started, completed, value)
  local s = self.sched
  s.load[rec.engine] = math.max(0, (s.load[rec.engine] or 1) - 1)
  self.running = false
  if self.timed_out then
    ok, value = false, errors.TaskError.new("timeout",
      string.format("task ran past its timeout of %gs and was interrupted", self.timeout), rec.id)
  elseif not ok and self.retries > 0 then
    self.retries = self.retries - 1
    self.last_error = value
    self.excluded = self.excluded or {}
    self.excluded[rec.engine] = true
    s.held[#s.held + 1] = self
    s:dispatch()
    return
  end
  self.done = true
  if self.timer then wait.release_timer(self.timer) end
  self.timer = nil
  self.slot.task = nil
  self.ar:_settle(self.slot, ok, started, completed, value)
  -- Interrupting: the task queued behind this one on its engine starts now.
  if self.ar._interrupting then interrupt_tasks(self.ar) end
  s:dispatch()
end

function Task:on_timeout()
  self.timer = nil
  if self.done then return end
  if self.running then
    self.timed_out = true
    self.sched.hub:interrupt_task(self.engine, self.id)
  else
    self:fail(errors.TaskError.new("timeout",
      string.format("task did not start within its timeout of %gs", self.timeout), nil))
    for i = #self.sched.held, 1, -1 do
      if self.sched.held[i] == self then table.remove(self.sched.held, i) end
    end
  end
end

-- The view.

local LoadBalancedView = {}
LoadBalancedView.__index = LoadBalancedView

local FLAGS = { block = true, timeout = true, retries = true, after = true, follow = true,
                scheme = true, queue_depth = true }
local SCHEMES = { least = true, lru = true, random = true }
local options = require "lpar.options"
local MAP_OPTIONS = options.set({ "chunksize", "ordered" }, FLAGS)

--- A load-balanced view of `client` over the engines of `spec` (nil: all);
-- made by rc:load_balanced_view(targets).
function LoadBalancedView.new(client, spec)
  local self = setmetatable({ client = client, block = false, retries = 0, scheme = "least",
                              queue_depth = 2 }, LoadBalancedView)
  if spec ~= nil then
    self.targets = client._hub:resolve_targets(spec, 3)
    if #self.targets == 0 then
      error(string.format("load_balanced_view: no engines in targets %s (engines up: %s)",
        viewflags.describe_spec(spec), table.concat(client._hub:ids_shared(), " ")), 3)
    end
  else
    self.targets = "all"
  end
  return self
end

function LoadBalancedView:__tostring() return viewflags.describe("LoadBalancedView", self.targets) end

--- A copy of this view with the given flags changed.
function LoadBalancedView:with(flags)
  return viewflags.with(self, flags, FLAGS)
end

local function result_list(x)
  if x == nil then return nil end
  if getmetatable(x) == AsyncResult then return { x } end
  return x
end

--- Queue one task (f, args) as `slot` of `ar`; `later`: the caller dispatches.
local function submit_task(self, ar, slot, f, args, later)
  if not SCHEMES[self.scheme] then
    error(string.format("unknown scheme %q (least, lru, random)", tostring(self.scheme)), 3)
  end
  local sched = scheduler_of(self.client._hub)
  local task = setmetatable({
    sched = sched, ar = ar, slot = slot, f = f, args = args, retries = self.retries or 0,
    timeout = self.timeout, depth = math.max(1, self.queue_depth or 2), scheme = self.scheme,
    targets = type(self.targets) == "table" and self.targets or nil,
    after = result_list(self.after), follow = result_list(self.follow),
  }, Task)
  if task.timeout then
    task.timer = wait.acquire_timer(task.timeout, function() task:on_timeout() end)
  end
  slot.task = task -- while it is pending: for Ctrl-C (interrupt_tasks)
  ar._interrupt = interrupt_tasks
  sched:enqueue(task, later)
  return task
end

--- f(...) as one task on the least-loaded engine, not waiting: the AsyncResult.
function LoadBalancedView:apply_async(f, ...)
  if type(f) ~= "function" then error("apply: expected a function, got " .. type(f), 2) end
  if #self.client == 0 then error("no engines are running", 2) end
  local ar = AsyncResult.new("apply", { single = true })
  submit_task(self, ar, ar:_slot(nil), f, table.pack(...))
  return ar
end

--- f(...) as one task, waiting: its values.
function LoadBalancedView:apply_sync(f, ...)
  return self:apply_async(f, ...):get()
end

--- f(...) on the least-loaded engine: the AsyncResult, or the values when `block`.
function LoadBalancedView:apply(f, ...)
  local ar = self:apply_async(f, ...)
  if self.block then return ar:get() end
  return ar
end

local function map_chunk(f, chunk)
  local out = {}
  for i = 1, #chunk do out[i] = f(chunk[i]) end
  return out, #chunk
end

--- Concatenate chunk results; in submission order, or arrival order when
-- the map is unordered. Failed chunks give their error per element when
-- get{return_errors = true} asked for them.
local function finish_map(ordered)
  return function(slots, _, ar)
    local order = ordered and slots or ar._arrivals
    local out, k = {}, 0
    for _, s in ipairs(order) do
      if s.ok then
        local part, n = s.values[1], s.values[2]
        for j = 1, n do out[k + j] = part[j] end
        k = k + n
      else
        for j = 1, s.count do out[k + j] = s.error end
        k = k + s.count
      end
    end
    return out
  end
end

--- f over `list` in chunks of `chunksize` (default 1) as separate tasks.
function LoadBalancedView:map_async(f, list, opts)
  if type(f) ~= "function" then error("map: expected a function, got " .. type(f), 2) end
  if type(list) ~= "table" then error("map: expected a list", 2) end
  opts = options.check("map", opts, MAP_OPTIONS)
  local size = opts.chunksize or 1
  if math.type(size) ~= "integer" or size < 1 then error("map: chunksize must be a positive integer", 2) end
  local view = self
  local flags = {}
  for k, v in pairs(opts) do
    if FLAGS[k] then flags[k] = v end
  end
  if next(flags) then view = self:with(flags) end
  local ordered = opts.ordered ~= false
  local ar = AsyncResult.new("map", { finish = finish_map(ordered) })
  ar._ordered = ordered
  local n = list.n or #list
  for first = 1, n, size do
    local chunk = table.move(list, first, math.min(n, first + size - 1), 1, {})
    local slot = ar:_slot(nil)
    slot.count = #chunk
    submit_task(view, ar, slot, map_chunk, table.pack(f, chunk), true)
  end
  scheduler_of(self.client._hub):dispatch()
  return ar
end

--- map_async, waited for: the results (in order unless opts.ordered is false).
function LoadBalancedView:map_sync(f, list, opts)
  options.check("map_sync", opts, MAP_OPTIONS)
  return self:map_async(f, list, opts):get()
end

--- f over `list` in tasks of opts.chunksize items: the results when
-- blocking, else the AsyncResult.
function LoadBalancedView:map(f, list, opts)
  options.check("map", opts, MAP_OPTIONS)
  local ar = self:map_async(f, list, opts)
  local block = self.block
  if opts and opts.block ~= nil then block = opts.block end
  if block then return ar:get() end
  return ar
end

--- f over an iterable (a list, or an iterator function) consumed lazily,
-- keeping at most `max_outstanding` tasks in flight (default: twice the
-- engines' queues); returns an iterator over the results as they arrive.
-- A failed task raises its error from the iterator.
function LoadBalancedView:imap(f, iterable, opts)
  if type(f) ~= "function" then error("imap: expected a function, got " .. type(f), 2) end
  opts = options.check("imap", opts, { max_outstanding = true })
  local next_item
  if type(iterable) == "function" then
    next_item = iterable
  elseif type(iterable) == "table" then
    local i = 0
    next_item = function()
      i = i + 1
      return iterable[i]
    end
  else
    error("imap: expected a list or an iterator function", 2)
  end
  local limit = opts.max_outstanding or 2 * (self.queue_depth or 2) * math.max(1, #self.client)
  local pending, exhausted = {}, false
  local stats = { max_in_flight = 0 }
  local function fill()
    while not exhausted and #pending < limit do
      local item = next_item()
      if item == nil then
        exhausted = true
      else
        local ar = self:apply_async(f, item)
        pending[#pending + 1] = ar
        stats.max_in_flight = math.max(stats.max_in_flight, #pending)
      end
    end
  end
  local iterator = function()
    fill()
    if #pending == 0 then return nil end
    local found
    wait.until_done(function()
      for i, ar in ipairs(pending) do
        if ar:ready() then
          found = i
          return true
        end
      end
      return false
    end, nil, nil, 2)
    local ar = table.remove(pending, found)
    fill()
    return ar:get()
  end
  return iterator, stats
end

--- Wait for the given results (or one); true when all are done.
function LoadBalancedView:wait(results, timeout)
  return self.client:wait(results, timeout)
end

--- Fail the queued tasks of `results` with an "aborted" TaskError; tasks
-- already running are left alone (interrupt them with rc:interrupt).
function LoadBalancedView.abort(client, results)
  local sched = client._hub.scheduler
  if not sched then return 0 end
  local wanted = {}
  for _, ar in ipairs(result_list(results)) do wanted[ar] = true end
  local n = 0
  local function abort_in(list, first, last)
    for i = first, last do
      local task = list[i]
      if task and not task.done and not task.running and wanted[task.ar] then
        task:fail(errors.TaskError.new("aborted", "task was aborted before it ran", nil))
        n = n + 1
      end
    end
  end
  abort_in(sched.queue, sched.head, sched.tail)
  abort_in(sched.held, 1, #sched.held)
  return n
end

return LoadBalancedView
