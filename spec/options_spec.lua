-- Strict options: a misspelled key is an error naming it, with a suggestion,
-- before anything starts or is sent.
local lpar = require "lpar"
local options = require "lpar.options"

local function message(f)
  local ok, err = pcall(f)
  assert.is_false(ok, "expected an error")
  return tostring(err)
end

describe("strict options", function()
  it("refuses a misspelled Cluster option, naming it and the nearest one, and starts nothing", function()
    local err = message(function() lpar.Cluster { nengines = 2 } end)
    assert.matches("unknown option 'nengines' %(did you mean 'n'%?%)", err)
    assert.matches("^spec/options_spec.lua:%d+: Cluster: ", err) -- raised at the caller's line
    assert.matches("did you mean 'blas_threads'", message(function() lpar.Cluster { blas_thread = 2 } end))
  end)

  it("lists the known options when none is near", function()
    assert.matches("unknown option 'zzz' %(known: blas_threads, engine, engine_env, hostfile, hosts, ip, " ..
      "launcher, mem_limit, mpiexec_args, n, port, profile, remote_command, ssh_command, timeout%)",
      message(function() lpar.Cluster { zzz = 1 } end))
  end)

  it("refuses a misspelled Client option", function()
    assert.matches("Client: unknown option 'profil' %(did you mean 'profile'%?%)",
      message(function() lpar.Client { profil = "x" } end))
  end)

  describe("on a running cluster", function()
    local cluster, rc
    lazy_setup(function()
      cluster = lpar.Cluster { n = 2 }
      rc = cluster:start_and_connect()
    end)
    lazy_teardown(function()
      rc:close()
      cluster:stop()
    end)

    it("refuses misspelled view flags in with{}", function()
      assert.matches("with: unknown view flag 'blok' %(did you mean 'block'%?%)",
        message(function() rc:view():with { blok = true } end))
      assert.matches("with: unknown view flag 'timout' %(did you mean 'timeout'%?%)",
        message(function() rc:load_balanced_view():with { timout = 1 } end))
    end)

    it("refuses misspelled per-call options, before sending anything", function()
      local dview = rc:view()
      assert.matches("execute: unknown option 'blocking' %(did you mean 'block'%?%)",
        message(function() dview:execute("never_set = 1", { blocking = true }) end))
      -- It never ran: pulling the name it would have set fails, as for any unset name.
      assert.matches("name 'never_set' is not defined",
        message(function() dview:pull("never_set", { block = true }) end))
      assert.matches("push: unknown option", message(function() dview:push({ a = 1 }, { blok = true }) end))
      assert.matches("map: unknown option 'chunk_size' %(did you mean 'chunksize'%?%)",
        message(function() rc:load_balanced_view():map(print, { 1 }, { chunk_size = 2 }) end))
      local ar = rc[0]:apply_async(function() return 1 end)
      assert.matches("get: unknown option 'timeuot'", message(function() ar:get { timeuot = 1 } end))
      assert.equal(1, ar:get(5))
      assert.matches("px: unknown option 'local' %(did you mean 'locally'%?%)",
        message(function() lpar.px("x = 1", { ["local"] = true }) end))
      assert.matches("timeit: unknown option 'repeat'",
        message(function() lpar.timeit(function() end, { ["repeat"] = 1 }) end))
    end)
  end)

  it("suggests the nearest name by edits or by a known prefix", function()
    local known = options.set { "n", "block", "retries", "timeout" }
    assert.equal("n", options.suggest("nengines", known))
    assert.equal("block", options.suggest("blocking", known))
    assert.equal("retries", options.suggest("retry", known))
    assert.equal("timeout", options.suggest("timeuot", known))
    assert.is_nil(options.suggest("x", known))
  end)
end)
