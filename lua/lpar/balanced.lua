--- LoadBalancedView: tasks go to whichever engine is least loaded.
--   local lb = rc:load_balanced_view()
--   lb:map(f, list, {chunksize = 10, ordered = false})
-- Dispatch is pipelined: each engine holds up to `queue_depth` tasks (a view
-- flag, default 2), so it never waits a round trip between tasks; the rest
-- wait here, in the client, in submission order. Behind a standalone
-- controller the controller picks the engine (for every client at once, so
-- clients mapping together share the engines): a task that may go anywhere
-- is sent there, a few per engine ahead, and learns its engine when placed.
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
                     last = {}, tick = 0, grace = STRANDED_GRACE,
                     shared = 0, unplaced = {} }, Scheduler)
  hub.scheduler = s
  -- An engine that comes up (or goes) changes where tasks can go.
  hub.on_ready[#hub.on_ready + 1] = function()
    -- With no engine left, what waits in the controller comes back here,
    -- where it waits its grace for one (see Scheduler:stranded).
    if next(s.unplaced) and #hub:ids_shared() == 0 then s:withdraw_unplaced() end
    s:dispatch()
  end
  return s
end

local Task = {}
Task.__index = Task

-- What a map task of several items runs on its engine.
local function map_chunk(f, chunk)
  local out = {}
  for i = 1, #chunk do out[i] = f(chunk[i]) end
  return out
end

-- What a batch of a map's one-item tasks runs on its engine: each item on
-- its own, its value in the list or its error in `failed`. An interrupt
-- stops the whole batch, as it stops a task.
local function map_batch(f, items, n)
  local out, failed = {}, nil
  local function report(e)
    if type(e) == "string" and e:match("interrupted$") then return e end
    return { message = tostring(e), traceback = debug.traceback(tostring(e), 2) }
  end
  for i = 1, n do
    local ok, v = xpcall(f, report, items[i])
    if ok then
      out[i] = v
    elseif type(v) == "string" then
      error(v, 0)
    else
      failed = failed or {}
      failed[i] = v
    end
  end
  out.failed = failed
  return out
end

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
  if not (task.targets or task.follow) and #hub:ids_shared() > 0 then return true end
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

--- Does the controller pick the engine of `task` (one that may go anywhere,
-- by the default scheme, behind a standalone controller)?
local function by_controller(self, task)
  return self.hub.controller and task.scheme == "least" and not (task.targets or task.follow or task.excluded)
end

--- Tasks a client keeps in the controller, placed or waiting there: enough
-- that the controller has the next at hand when an engine frees, even
-- after this process was off the CPU for a while (at twice the engines'
-- depth, a client starved of CPU for moments fell behind another: 2:1 on
-- 4 engines on 2 cores with every process busy).
local function controller_room(self, task, ids)
  return self.shared < 4 * task.depth * #ids
end

--- The least-loaded engine with room (the oldest used on a tie), for a
-- task that may go anywhere: the common case, without a list.
local function pick_least(self, depth, ids)
  local load, last = self.load, self.last
  local best, lb, ob
  for i = 1, #ids do
    local id = ids[i]
    local li = load[id] or 0
    if li < depth then
      local oi = last[id] or 0
      if best == nil or li < lb or (li == lb and oi < ob) then best, lb, ob = id, li, oi end
    end
  end
  return best
end

local function pick(self, task, ids)
  if task.scheme == "least" and not (task.targets or task.follow or task.excluded) then
    return pick_least(self, task.depth, ids)
  end
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
  self.result:_settle(self.slot, false, nil, nil, err)
  if self.result._feed then self.result._feed(self) end
end

local function submit(hub, engine, task, ...)
  if engine then return hub:submit(engine, APPLY, "args", task, ...) end
  return hub:submit_balanced(task.depth, APPLY, "args", task, ...)
end

--- Send `task` to `engine` (nil: to the controller, which picks): "sent",
-- "failed" (it cannot be sent anywhere, and is failed), or "gone" (the
-- engine, or the controller, is gone: the task is untouched).
function Scheduler:send(task, engine)
  -- The task is its own request record (ar = itself, kind, deadline, one).
  local hub = self.hub
  local ok, err
  if task.args then
    ok, err = submit(hub, engine, task, task.f, table.unpack(task.args, 1, task.args.n))
  elseif task.chunk then
    ok, err = submit(hub, engine, task, map_chunk, task.f, task.chunk)
  elseif task.batch then
    ok, err = submit(hub, engine, task, map_batch, task.f, task.batch, task.slot.batch)
  else
    ok, err = submit(hub, engine, task, task.f, task.item)
  end
  if not ok then
    if type(err) == "string" then
      task:fail(errors.RemoteError.new(engine, "apply", { message = err }))
      return "failed"
    end
    return "gone"
  end
  task.running, task.began = true, false
  task.slot.engine = engine
  if engine then
    self.load[engine] = (self.load[engine] or 0) + 1
    self.tick = self.tick + 1
    self.last[engine] = self.tick
  else
    task.shared = true
    self.shared = self.shared + 1
    self.unplaced[task] = true
  end
  return "sent"
end

--- Take back from the controller the tasks waiting there for an engine.
function Scheduler:withdraw_unplaced()
  for task in pairs(self.unplaced) do
    if not task.withdrawing then
      task.withdrawing = true
      self.hub:interrupt_task(nil, task.id)
    end
  end
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
  -- Silence changes on the scale of heartbeats: look again after a few
  -- milliseconds, not at every dispatch.
  local now = core.now()
  if self.responsive and self.responsive_from == ids and now < self.responsive_until then
    return self.responsive
  end
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
      self.responsive = nil
      self:dispatch()
    end)
  end
  self.responsive, self.responsive_from, self.responsive_until = out or ids, ids, now + 0.01
  return out or ids
end

--- Place queued tasks on engines with room, in submission order.
function Scheduler:dispatch()
  if self.dispatching then return end
  self.dispatching = true
  local ids = self:responsive_ids()
  -- Tasks held back by dependencies or placement go first once free.
  if #self.held > 0 then
    local still = {}
    for _, task in ipairs(self.held) do
      if not task.done and not self:place(task, ids) and not self:stranded(task) then
        still[#still + 1] = task
      end
    end
    self.held = still
  end
  while self.head <= self.tail do
    local task = self.queue[self.head]
    -- The common case first: a task that may go anywhere, and no engine has room.
    if not task.done and #ids > 0 and not (task.after or task.targets or task.follow or task.excluded)
      and task.scheme == "least" then
      if self.hub.controller then
        if not controller_room(self, task, ids) then break end
      elseif pick_least(self, task.depth, ids) == nil then
        break
      end
    end
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
  if by_controller(self, task) then
    if #ids == 0 or not controller_room(self, task, ids) then return false end
    return self:send(task, nil) ~= "gone"
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
-- queues a window of tasks, then dispatches once: a dispatch per task made
-- submitting thousands take tens of ms in which the loop saw no event).
function Scheduler:enqueue(task, later)
  self.tail = self.tail + 1
  self.queue[self.tail] = task
  if not later then self:dispatch() end
end

-- A task is the record the hub settles; it forwards to its AsyncResult slot.

function Task:_stream(_, name, text) self.result:_stream(self.slot, name, text) end
function Task:_display(_, output) self.result:_display(self.slot, output) end

--- Ctrl-C while waiting on `ar`: its running tasks are interrupted (and
-- not retried), its queued ones fail without running.
local function interrupt_tasks(ar)
  ar._interrupting = true
  if ar._stop then ar._stop(errors.TaskError.new("aborted", "interrupted before it ran", nil)) end
  for _, s in pairs(ar._c and ar._c.live or ar._slots) do
    local task = not s.done and s.task
    if task and not task.done then
      task.retries = 0
      if task.running and task.engine == nil then -- waiting in the controller: taken back
        task:fail(errors.TaskError.new("aborted", "interrupted before it ran", nil))
        task.sched.hub:interrupt_task(nil, task.id)
      elseif task.running then
        task.sched.hub:interrupt_task(task.engine, task.id)
      else
        task:fail(errors.TaskError.new("aborted", "interrupted before it ran", nil))
      end
    end
  end
end

--- The engine began it (only tasks with a deadline say so).
function Task:_started() self.began = true end

--- The controller sent it to engine rec.engine.
function Task:_placed(rec)
  local s, engine = self.sched, rec.engine
  s.unplaced[self] = nil
  s.load[engine] = (s.load[engine] or 0) + 1
  s.tick = s.tick + 1
  s.last[engine] = s.tick
  if self.done then
    -- It failed as it was placed (aborted, interrupted): stop it should it start.
    s.hub:interrupt_task(engine, rec.id)
  else
    self.slot.engine = engine
  end
end

--- The controller gave it back unsent, as asked: it waits here again
-- (when every engine went), unless it has failed meanwhile.
function Task:_withdrawn()
  local s = self.sched
  s.unplaced[self] = nil
  s.shared = s.shared - 1
  self.shared, self.running, self.withdrawing = false, false, nil
  if not self.done then s.held[#s.held + 1] = self end
  s:dispatch()
end

function Task:_settle(rec, ok, started, completed, value)
  local s = self.sched
  if rec.engine then s.load[rec.engine] = math.max(0, (s.load[rec.engine] or 1) - 1) end
  if self.shared then
    self.shared = false
    s.shared = s.shared - 1
    s.unplaced[self] = nil
  end
  self.running = false
  if self.done then -- failed at its deadline already: its engine is free again
    s:dispatch()
    return
  end
  if self.timed_out then
    ok, value = false, errors.TaskError.new("timeout",
      string.format("task ran past its timeout of %gs and was interrupted", self.timeout), rec.id, rec.engine)
  elseif not ok and self.retries > 0 and rec.engine then -- (no engine: the controller is gone)
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
  if ok and self.batch then
    if type(value) ~= "table" then
      ok, value = false, errors.RemoteError.new(rec.engine, "map",
        { message = "a batch came back without its list" }, rec.id)
    elseif value.failed then
      for i, e in pairs(value.failed) do value.failed[i] = errors.RemoteError.new(rec.engine, "map", e, rec.id) end
    end
  end
  self.result:_settle(self.slot, ok, started, completed, value)
  if self.result._feed then self.result._feed(self) end
  -- Interrupting: the task queued behind this one on its engine starts now.
  if self.result._interrupting then interrupt_tasks(self.result) end
  s:dispatch()
end

-- After a running task's deadline, how long its interrupt may take to
-- come back as its reply before the task is failed anyway (a task deep in
-- a C call only stops when the call returns).
local INTERRUPT_GRACE = 0.1

--- Its deadline: a task still queued (here, or on an engine that has not
-- begun it) fails now and never runs; a running one is interrupted.
function Task:on_timeout()
  self.timer = nil
  if self.done then return end
  local hub = self.sched.hub
  if not self.running then
    self:fail(errors.TaskError.new("timeout", string.format(
      "timed out while queued: the task did not start within its timeout of %gs", self.timeout), nil))
    for i = #self.sched.held, 1, -1 do
      if self.sched.held[i] == self then table.remove(self.sched.held, i) end
    end
  elseif self.engine == nil then
    -- Still in the controller: taken back, or dropped unstarted by the
    -- engine it goes to meanwhile (the deadline travels with it).
    hub:interrupt_task(nil, self.id)
    self:fail(errors.TaskError.new("timeout", string.format(
      "timed out while queued in the controller: the task did not start within its timeout of %gs",
      self.timeout), self.id))
  elseif not self.began then
    -- Its engine drops it unstarted (the deadline travelled with it); the
    -- interrupt covers a start already on its way here.
    hub:interrupt_task(self.engine, self.id)
    self:fail(errors.TaskError.new("timeout", string.format(
      "timed out while queued on engine %d: the task did not start within its timeout of %gs",
      self.engine, self.timeout), self.id, self.engine))
  else
    self.timed_out = true
    hub:interrupt_task(self.engine, self.id)
    self.timer = wait.acquire_timer(INTERRUPT_GRACE, function()
      self.timer = nil
      self:fail(errors.TaskError.new("timeout", string.format(
        "task ran past its timeout of %gs; it was interrupted, but engine %d has not stopped it yet",
        self.timeout, self.engine), self.id, self.engine))
    end)
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
-- Tasks of one map in flight at most (more with many engines).
local MAP_WINDOW = 1024
-- A batch of tiny one-item tasks aims to take this long on its engine,
-- and holds at most MAX_BATCH of them.
local BATCH_SECONDS = 0.0005
local MAX_BATCH = AsyncResult.MAX_BATCH

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

--- Queue one task as `slot` of `ar`: f(table.unpack(args)), or f(item)
-- for one item of a map, or f over each of `chunk` for several (then
-- the task's result is its first value). Submitted at `since` (default
-- now: its timeout counts from then). `later`: the caller dispatches.
local function submit_task(self, ar, slot, f, since, args, item, chunk, batch, later)
  if not SCHEMES[self.scheme] then
    error(string.format("unknown scheme %q (least, lru, random)", tostring(self.scheme)), 3)
  end
  local sched = scheduler_of(self.client._hub)
  -- A task with a timeout waits here, not behind another on an engine:
  -- it goes only to an idle engine, so its time is spent running.
  local depth = self.timeout and 1 or math.max(1, self.queue_depth or 2)
  local task = setmetatable({
    sched = sched, result = ar, slot = slot, kind = slot.kind, f = f, args = args, item = item,
    chunk = chunk, batch = batch, one = args == nil, retries = self.retries or 0,
    timeout = self.timeout, depth = depth, scheme = self.scheme,
    deadline = self.timeout and (since or core.now()) + self.timeout or nil,
    targets = type(self.targets) == "table" and self.targets or nil,
    after = result_list(self.after), follow = result_list(self.follow),
  }, Task)
  task.ar = task -- the hub settles a request through its record's ar: a task is its own
  if task.timeout then
    task.timer = wait.acquire_timer(math.max(0, task.deadline - core.now()), function() task:on_timeout() end)
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
  submit_task(self, ar, ar:_slot(nil), f, nil, table.pack(...))
  self.client:_track(ar, self.apply_async, self, f, ...) -- for rc:wait(), rc:resubmit
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
  -- For rc:wait() and rc:resubmit (which maps the list as it is then).
  local track_list = list
  -- Tasks are made as the window has room, not all at once: a long map
  -- holds the tasks in flight and the results, and no more. The list is
  -- copied, so changing it afterwards changes nothing.
  local n = list.n or #list
  list = table.move(list, 1, n, 1, {})
  local ar = AsyncResult.new("map", { compact = { n = n, size = size, ordered = opts.ordered ~= false } })
  self.client:_track(ar, self.map_async, self, f, track_list, opts)
  local since = core.now()
  local sched = scheduler_of(self.client._hub)
  local engines = math.max(1, #self.client)
  local window = math.max(MAP_WINDOW, 4 * view.queue_depth * engines)
  -- One-item tasks that prove tiny go several to a request (each keeps its
  -- own result and error): not with a timeout or retries, which are per task.
  local batching = size == 1 and not view.timeout and (view.retries or 0) == 0
  local item_time -- seconds an item takes on its engine, as seen so far
  local first, in_flight, feeding = 1, 0, false
  local function batch_size()
    if not batching or not item_time then return 1 end
    local k = math.floor(BATCH_SECONDS / math.max(item_time, 1e-7))
    -- Not so many that the last ones leave engines idle.
    k = math.min(k, MAX_BATCH, (n - first + 1) // (4 * engines))
    return math.max(1, k)
  end
  local function feed()
    if feeding then return end -- a task failed as it was submitted: the loop goes on
    feeding = true
    while first <= n and in_flight < window do
      local last = math.min(n, first + size - 1)
      local k = batch_size()
      in_flight = in_flight + 1
      if k > 1 then
        last = first + k - 1
        local slot = ar:_slot(nil, k)
        local items = table.move(list, first, last, 1, {})
        for i = first, last do list[i] = nil end
        submit_task(view, ar, slot, f, since, nil, nil, nil, items, true)
      elseif size == 1 then
        local slot = ar:_slot(nil)
        local item = list[first]
        list[first] = nil
        submit_task(view, ar, slot, f, since, nil, item, nil, nil, true)
      else
        local slot = ar:_slot(nil)
        local chunk = table.move(list, first, last, 1, {})
        for i = first, last do list[i] = nil end
        submit_task(view, ar, slot, f, since, nil, nil, chunk, nil, true)
      end
      first = last + 1
    end
    feeding = false
    sched:dispatch()
  end
  ar._feed = function(task)
    in_flight = in_flight - 1
    local slot = task and task.slot
    if batching and slot and slot.started and slot.completed and slot.ok then
      local t = (slot.completed - slot.started) / (slot.batch or 1)
      item_time = item_time and 0.8 * item_time + 0.2 * t or t
    end
    feed()
  end
  -- Abort and Ctrl-C: the tasks not made yet fail as the queued ones do.
  ar._stop = function(err)
    while first <= n do
      local last = math.min(n, first + size - 1)
      local slot = ar:_slot(nil)
      for i = first, last do list[i] = nil end
      first = last + 1
      ar:_settle(slot, false, nil, nil, err)
    end
  end
  local hub = sched.hub
  if hub.core then hub.core:batch(feed) else feed() end
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

--- A callable running `f` as one load-balanced task per call, as
-- ipyparallel's `@view.remote`; `opts`: view flags for its calls, such as
-- `block` or `timeout` (see lpar.remotefunction).
function LoadBalancedView:remote(f, opts) return require("lpar.remotefunction").remote(self, f, opts, 3) end

--- A ParallelFunction over `f`, as ipyparallel's `@view.parallel`:
-- `pf:map(list)` is a load-balanced map of f; `pf(list)` calls f on parts of
-- the list (one per engine, or `chunksize` items each) and joins the lists
-- it returns. `opts`: `block`, `chunksize`, `ordered` and view flags.
function LoadBalancedView:parallel(f, opts) return require("lpar.remotefunction").parallel(self, f, opts, 3) end

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
      if task and not task.done and not task.running and wanted[task.result] then
        task:fail(errors.TaskError.new("aborted", "task was aborted before it ran", nil))
        n = n + (task.slot.batch or 1)
      end
    end
  end
  -- First the tasks a map has not made yet, so aborting its queued ones
  -- does not make more.
  for ar in pairs(wanted) do
    if ar._stop then
      local before = ar._done
      ar._stop(errors.TaskError.new("aborted", "task was aborted before it ran", nil))
      n = n + ar._done - before
    end
  end
  abort_in(sched.queue, sched.head, sched.tail)
  abort_in(sched.held, 1, #sched.held)
  -- Those waiting in the controller for an engine are taken back.
  for task in pairs(sched.unplaced) do
    if not task.done and wanted[task.result] then
      task:fail(errors.TaskError.new("aborted", "task was aborted before it ran", nil))
      sched.hub:interrupt_task(nil, task.id)
      n = n + (task.slot.batch or 1)
    end
  end
  return n
end

return LoadBalancedView
