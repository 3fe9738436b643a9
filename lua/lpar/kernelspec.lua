--- `lpar kernel ...`: the Jupyter kernel and its kernelspec.
--   lpar kernel -f CONNECTION_FILE   run the kernel (Jupyter starts it so)
--   lpar kernel install [--user | --prefix DIR | --sys-prefix] [--name NAME]
--   lpar kernel uninstall [--user | --prefix DIR | --sys-prefix] [--name NAME]
-- The kernelspec is a directory KERNELS/NAME holding kernel.json (argv runs
-- this lpar, by its absolute path) and two logos drawn by lpar.plot.
-- KERNELS is, as for ipykernel: $JUPYTER_DATA_DIR/kernels or
-- ~/.local/share/jupyter/kernels with --user; DIR/share/jupyter/kernels with
-- --prefix; the prefix of the `jupyter` on PATH with --sys-prefix; and
-- /usr/local/share/jupyter/kernels by default.
local uv = require "luv"
local core = require "lpar.core"
local jupyter = require "lpar.jupyter"

local kernelspec = {}

local USAGE = [[
usage: lpar kernel -f CONNECTION_FILE
       lpar kernel install [--user | --prefix DIR | --sys-prefix] [--name NAME]
       lpar kernel uninstall [--user | --prefix DIR | --sys-prefix] [--name NAME]
]]

kernelspec.DISPLAY_NAME = "Lua 5.4 (lpar)"

local function fail(fmt, ...)
  io.stderr:write("lpar kernel: ", string.format(fmt, ...), "\n")
  return 1
end

local function lpar_command()
  local exe = uv.exepath()
  if exe and exe:match("/lpar$") then return exe end
  return core.command_path
end

local function sh_quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

--- The directory `jupyter` on PATH was installed under (its sys.prefix).
local function sys_prefix()
  local p = io.popen("command -v jupyter 2>/dev/null")
  local path = p and p:read("l")
  if p then p:close() end
  if not path or path == "" then error("--sys-prefix: there is no `jupyter` on PATH", 0) end
  local real = uv.fs_realpath(path) or path
  return (real:match("^(.*)/bin/[^/]+$") or "/usr")
end

--- Where the kernelspec goes, from the options.
function kernelspec.kernels_dir(opts)
  if opts.prefix then return opts.prefix .. "/share/jupyter/kernels" end
  if opts["sys-prefix"] then return sys_prefix() .. "/share/jupyter/kernels" end
  if opts.user then
    local data = os.getenv("JUPYTER_DATA_DIR")
    if data and data ~= "" then return data .. "/kernels" end
    local home = os.getenv("HOME")
    if not home or home == "" then error("--user: HOME is not set", 0) end
    return home .. "/.local/share/jupyter/kernels"
  end
  return "/usr/local/share/jupyter/kernels"
end

--- Where and under which name, from the options lpar.cli parsed.
local function parse(opts)
  if not opts.name:match("^[%w_.-]+$") then error(string.format("bad kernel name %q", opts.name), 0) end
  return { user = opts.user, prefix = opts.prefix, ["sys-prefix"] = opts.sys_prefix, name = opts.name }
end

--- The logo: lpar's four engines as four tiles, drawn with lpar.plot.
local function logo(size)
  local matrix = require "lpar.matrix"
  local A = matrix.zeros(8, 8)
  for i = 1, 8 do
    for j = 1, 8 do
      local tile = (i > 4 and 2 or 0) + (j > 4 and 1 or 0)
      local border = i == 1 or i == 8 or j == 1 or j == 8 or i == 4 or i == 5 or j == 4 or j == 5
      A:set(i, j, border and 0 or 0.4 + 0.2 * tile)
    end
  end
  return (matrix._png(A, "viridis", size // 8, 0, 1))
end

local function write_file(path, text)
  local f, err = io.open(path, "wb")
  if not f then error(string.format("cannot write %s: %s", path, err), 0) end
  f:write(text)
  f:close()
end

local function install(args)
  local opts = parse(args)
  local dir = kernelspec.kernels_dir(opts) .. "/" .. opts.name
  local ok = os.execute("mkdir -p " .. sh_quote(dir))
  if not ok then return fail("cannot create %s", dir) end
  write_file(dir .. "/kernel.json", jupyter.encode {
    argv = { lpar_command(), "kernel", "-f", "{connection_file}" },
    display_name = opts.name == "lpar" and kernelspec.DISPLAY_NAME or
      string.format("%s (%s)", kernelspec.DISPLAY_NAME, opts.name),
    language = "lua",
    interrupt_mode = "signal",
    metadata = { debugger = false },
  } .. "\n")
  write_file(dir .. "/logo-32x32.png", logo(32))
  write_file(dir .. "/logo-64x64.png", logo(64))
  print(string.format("Installed kernelspec %s in %s", opts.name, dir))
  return 0
end

local function uninstall(args)
  local opts = parse(args)
  local dir = kernelspec.kernels_dir(opts) .. "/" .. opts.name
  if not uv.fs_stat(dir .. "/kernel.json") then return fail("no kernelspec %s in %s", opts.name, dir) end
  for _, f in ipairs { "kernel.json", "logo-32x32.png", "logo-64x64.png" } do os.remove(dir .. "/" .. f) end
  local rmdir_ok, err = uv.fs_rmdir(dir)
  if not rmdir_ok then return fail("removed the kernelspec's files, but not %s: %s", dir, err) end
  print(string.format("Removed kernelspec %s from %s", opts.name, dir))
  return 0
end

--- `lpar kernel ...`, with the options lpar.cli parsed: an exit status.
function kernelspec.main(opts)
  if opts.f then return require("lpar.kernel").run(opts.f) end
  if opts.action == "install" then return install(opts) end
  if opts.action == "uninstall" then return uninstall(opts) end
  io.stderr:write(USAGE)
  return 2
end

return kernelspec
