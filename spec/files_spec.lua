-- Files lpar writes: display outputs in a per-user 0700 directory, and
-- connection files as JSON that any tool can read.
local helpers = require "helpers"
local uv = require "luv"

describe("display outputs", function()
  it("go to a 0700 directory under $XDG_CACHE_HOME, never a shared /tmp one", function()
    local cache = os.tmpname()
    os.remove(cache)
    local out, code = helpers.run("env -u LPAR_OUTPUT_DIR -u LPAR_DIR XDG_CACHE_HOME='" .. cache .. "' " ..
      helpers.lpar .. [[ -e '
      local rc <close> = require("lpar").Cluster { n = 1 }:start_and_connect()
      rc[0]:apply_async(function() lpar.engine.display("text/plain", "note") end):display_outputs()' 2>&1]])
    assert.equal(0, code, out)
    local path = out:match("%[output:0%] (%S+)")
    assert.is_truthy(path, out)
    assert.equal(cache .. "/lpar/outputs/", path:sub(1, #cache + 14))
    local f = assert(io.open(path))
    assert.equal("note", f:read("a"))
    f:close()
    assert.equal(tonumber("700", 8), uv.fs_stat(cache .. "/lpar/outputs").mode % 512)
    os.execute("rm -rf '" .. cache .. "'")
  end)
end)

describe("a connection file", function()
  it("is JSON with the key, the socket and the pid", function()
    local dir = os.tmpname()
    os.remove(dir)
    local profile = require "lpar.profile"
    os.execute("mkdir -m 700 '" .. dir .. "'")
    local path = dir .. "/connection.json"
    profile.write(path, { profile = "p", socket = dir .. "/s\"ock", pid = 42, started = 1.5,
                          key = string.rep("\1", 32) })
    local f = assert(io.open(path))
    local doc = require("dkjson").decode(f:read("a"))
    f:close()
    assert.same({ profile = "p", socket = dir .. "/s\"ock", pid = 42, started = 1.5, key = string.rep("01", 32) }, doc)
    local info = profile.read(path)
    assert.equal(string.rep("\1", 32), info.key)
    assert.equal(42, info.pid)
    os.execute("rm -rf '" .. dir .. "'")
  end)
end)
