local helpers = require "helpers"

-- The README's first example runs, and prints what its `-->` comments say.
describe("the README's example", function()
  it("prints what it promises", function()
    local f = assert(io.open("README.md"))
    local readme = f:read("a")
    f:close()
    local code = assert(readme:match("```lua\n(.-)```"), "no lua block in the README")
    local expected = {}
    for line in code:gmatch("[^\n]+") do
      local want = line:match("%-%->%s*(.-)%s*$")
      if want then expected[#expected + 1] = want end
    end
    local path = os.tmpname()
    f = assert(io.open(path, "w"))
    f:write(code)
    f:close()
    local out, status = helpers.run(helpers.lpar .. " " .. path .. " 2>&1")
    os.remove(path)
    assert.equal(0, status, out)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.is_true(#expected >= 4)
    for i, want in ipairs(expected) do assert.equal(want, lines[i]) end
  end)
end)
