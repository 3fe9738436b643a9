"""Drive `lpar kernel` with jupyter_client, as a notebook would.

    /usr/bin/python3 spec/kernel_client.py protocol STDERR_LOG
    /usr/bin/python3 spec/kernel_client.py notebook NOTEBOOK.ipynb OUT.ipynb

The kernelspec `lpar` must be on JUPYTER_PATH (spec/kernel_spec.lua installs
it under a temporary prefix). Prints one JSON object of what it saw on its
last line; every wait has a timeout, and the kernel is shut down (or killed)
whatever happens.
"""
import base64
import json
import os
import struct
import subprocess
import shutil
import sys
import tempfile
import time

from jupyter_client import KernelManager
from jupyter_client.session import Session

TIMEOUT = 20


def png_size(data):
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return list(struct.unpack(">II", data[16:24]))


def wait_for(pred, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise TimeoutError("the sign never came")
        time.sleep(0.01)


def ready(kc):
    """Wait for the kernel, and for iopub to carry its messages: a SUB socket
    misses what was published before its subscription reached the kernel, so
    kernel_info is asked until its idle status comes on iopub too."""
    kc.wait_for_ready(timeout=TIMEOUT)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        msg_id = kc.kernel_info()
        try:
            while True:
                m = kc.get_iopub_msg(timeout=0.2)
                if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                        and m["content"]["execution_state"] == "idle"):
                    return
        except Exception:
            continue
    raise TimeoutError("iopub never carried a status")


class Driver:
    def __init__(self, kc):
        self.kc = kc

    def collect(self, msg_id, timeout=TIMEOUT):
        """iopub messages caused by msg_id, until its idle status."""
        outs = []
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no idle status for %s" % msg_id)
            m = self.kc.get_iopub_msg(timeout=left)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            t = m["msg_type"]
            if t == "status" and m["content"]["execution_state"] == "idle":
                return outs
            if t != "status":
                outs.append({"type": t, "content": m["content"]})

    def reply(self, msg_id, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no reply to %s" % msg_id)
            m = self.kc.get_shell_msg(timeout=left)
            if m["parent_header"].get("msg_id") == msg_id:
                return m

    def run(self, code, timeout=TIMEOUT, **kw):
        msg_id = self.kc.execute(code, **kw)
        outs = self.collect(msg_id, timeout)
        r = self.reply(msg_id, timeout)
        return {"reply": r["content"], "outputs": outs}

    def request(self, name, timeout=TIMEOUT, **content):
        msg = self.kc.session.msg(name + "_request", content)
        self.kc.shell_channel.send(msg)
        return self.reply(msg["header"]["msg_id"], timeout)["content"]


def streams(result):
    return "".join(o["content"]["text"] for o in result["outputs"] if o["type"] == "stream")


def protocol(log_path):
    seen = {}
    km = KernelManager(kernel_name="lpar")
    t0 = time.time()
    km.start_kernel(stderr=open(log_path, "w"))
    kc = km.client()
    kc.start_channels()
    d = Driver(kc)
    try:
        ready(kc)
        seen["ready_seconds"] = time.time() - t0
        seen["kernel_pid"] = km.provisioner.process.pid
        info = d.reply(kc.kernel_info())["content"]
        seen["kernel_info"] = info

        seen["expression"] = d.run("1 + 1")
        seen["last_line"] = d.run("print('hi')\nlocal y = 3\ny * 2")
        seen["silent"] = d.run("quiet = 42", silent=True)
        seen["user_expressions"] = d.run("x = 7", user_expressions={"double": "x * 2", "bad": "x +"})
        seen["local_error"] = d.run("local t = nil\nreturn t.field")
        seen["binary_output"] = d.run("print('bad \\255 byte')")
        seen["inspect_doc"] = d.request("inspect", code="lpar.px", cursor_pos=7, detail_level=0)

        seen["cluster"] = d.run("rc = lpar.Cluster{n = 4}:start_and_connect()\n"
                                "dview = rc:view()\ndview.block = true\n#rc", timeout=60)
        pids = d.run("local p = {}\nfor i = 0, 3 do p[#p + 1] = rc:queue_status()[i].pid end\n"
                     "print(table.concat(p, ' '))")
        seen["engine_pids"] = [int(p) for p in streams(pids).split()]
        seen["streams"] = d.run("%px print('engine ' .. lpar.engine.id)\n%px a = lpar.engine.id * 10")
        # Output streams while the cell runs: the engine's early line comes a
        # second before the cell ends. (An engine sends its output on a write
        # 50 ms after the last send, so a second line, 0.1 s later, sends both.)
        msg_id = kc.execute("%%px --targets 1\nlocal function spin(s) local t = os.clock() "
                            "while os.clock() - t < s do end end\n"
                            "print('early') spin(0.1) print('tick') spin(1)")
        early = None
        while True:
            m = kc.get_iopub_msg(timeout=TIMEOUT)
            if m["parent_header"].get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream" and "early" in m["content"]["text"] and early is None:
                early = time.time()
            if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                break
        done = time.time()
        d.reply(msg_id)
        seen["streaming"] = {"early_before_end": None if early is None else done - early}
        r = d.run("for i = 1, 100000 do print(i) end")
        seen["many_lines"] = {"messages": sum(1 for o in r["outputs"] if o["type"] == "stream"),
                              "lines": streams(r).count("\n"), "last": streams(r)[-7:]}
        seen["remote_error"] = d.run("%px if lpar.engine.id == 2 then error('boom') end")
        seen["grouped_error"] = d.run("%px error('same everywhere')")

        r = d.run("%%px --targets 0::2\nlocal matrix = require 'lpar.matrix'\n"
                  "require('lpar.plot').imshow(matrix.random(16, 24), {scale = 4})")
        images = []
        for o in r["outputs"]:
            if o["type"] == "display_data" and "image/png" in o["content"]["data"]:
                images.append({"size": png_size(base64.b64decode(o["content"]["data"]["image/png"])),
                               "text": o["content"]["data"].get("text/plain"),
                               "metadata": o["content"]["metadata"]})
        seen["display"] = {"reply": r["reply"], "images": images}
        r = d.run("lpar.display{['text/html'] = '<b>bold</b>', ['text/plain'] = 'bold'}")
        seen["display_html"] = [o["content"]["data"] for o in r["outputs"] if o["type"] == "display_data"]

        r = d.run("local png, w, h = require('lpar.plot').imshow(require('lpar.matrix').random(4, 4), {scale = 2})")
        seen["local_image"] = [png_size(base64.b64decode(o["content"]["data"]["image/png"]))
                               for o in r["outputs"] if o["type"] == "display_data"]
        r = d.run("lb = rc:load_balanced_view()\n"
                  "ar = lb:map(function(x) return x end, {1, 2, 3, 4, 5, 6, 7, 8})\n"
                  "ar:wait_interactive()\n#ar:get()")
        seen["progress"] = [{"type": o["type"], "text": o["content"]["data"]["text/plain"],
                             "id": o["content"].get("transient", {}).get("display_id")}
                            for o in r["outputs"] if o["type"] in ("display_data", "update_display_data")]
        seen["autopx"] = [d.run("%autopx"), d.run("print('auto ' .. lpar.engine.id)"), d.run("%autopx"),
                          d.run("print('back here')")]
        seen["unknown_option"] = d.run("%%px --foo\nprint('ran here')")
        seen["pxconfig"] = [d.run("%pxconfig --targets 1 --verbose"), d.run("%px print('cfg')"),
                            d.run("%pxconfig --targets 9"),
                            d.run("%pxconfig --targets all --no-verbose\n%pxconfig")]
        msg_id = kc.execute("io.write('name? ')\nanswer = io.read()\nprint('hello ' .. answer)",
                            allow_stdin=True)
        request = kc.get_stdin_msg(timeout=TIMEOUT)
        kc.input("lpar")
        outs = d.collect(msg_id)
        seen["input"] = {"request": request["msg_type"], "reply": d.reply(msg_id)["content"],
                         "outputs": outs}
        seen["no_input"] = d.run("io.read()", allow_stdin=False)
        d.run("--- Twice x.\nfunction twice(x)\n  return 2 * x\nend")
        seen["inspect_cell"] = d.request("inspect", code="twice(3)", cursor_pos=2, detail_level=1)
        d.run("%%px --noblock\nprint('nb ' .. lpar.engine.id)\nlpar.engine.id * 2")
        seen["pxresult"] = d.run("%pxresult")
        seen["timeit_cell"] = d.run("%%timeit -n 10 -r 2\nlocal x = 1")
        seen["help"] = d.run("%help")
        seen["bad_request"] = d.request("complete", code=42, cursor_pos="x")
        seen["complete_rc"] = d.request("complete", code="rc:vi", cursor_pos=5)

        seen["complete_math"] = d.request("complete", code="x = math.fl", cursor_pos=11)
        seen["complete_magic"] = d.request("complete", code="%px", cursor_pos=3)
        seen["is_complete"] = {code: d.request("is_complete", code=code)["status"]
                               for code in ["for i = 1, 2 do", "x = 1", "x = = 1", "%px x = 1"]}
        seen["inspect"] = d.request("inspect", code="lpar.timeit", cursor_pos=6, detail_level=0)
        seen["history"] = d.request("history", hist_access_type="tail", n=3, output=False, raw=True)
        seen["comm_info"] = d.request("comm_info")

        # Interrupt a runaway %px by signal, as the stop button does.
        signs = tempfile.mkdtemp()
        msg_id = kc.execute("%%px\nio.open('" + signs + "/started-' .. lpar.engine.id, 'w'):close()\n"
                            "while true do end")
        wait_for(lambda: len(os.listdir(signs)) == 4)
        t1 = time.time()
        km.interrupt_kernel()
        r = d.reply(msg_id, timeout=10)
        seen["interrupt_px"] = {"seconds": time.time() - t1, "reply": r["content"]}
        d.collect(msg_id)
        seen["after_interrupt"] = d.run("%px print('alive', a)")

        # The same by message, on the control channel: the error still shows
        # under the cell.
        msg_id = kc.execute("%%px\nio.open('" + signs + "/again-' .. lpar.engine.id, 'w'):close()\n"
                            "while true do end")
        wait_for(lambda: len([f for f in os.listdir(signs) if f.startswith("again-")]) == 4)
        t1 = time.time()
        kc.control_channel.send(kc.session.msg("interrupt_request", {}))
        r = d.reply(msg_id, timeout=10)
        kc.get_control_msg(timeout=TIMEOUT)
        seen["interrupt_px_message"] = {"seconds": time.time() - t1, "reply": r["content"],
                                        "outputs": d.collect(msg_id)}

        # Interrupt local Lua by message, on the control channel.
        msg_id = kc.execute("io.open('%s/local', 'w'):close()\nwhile true do end" % signs)
        wait_for(lambda: os.path.exists(signs + "/local"))
        t1 = time.time()
        ir = kc.session.msg("interrupt_request", {})
        kc.control_channel.send(ir)
        r = d.reply(msg_id, timeout=10)
        cr = kc.get_control_msg(timeout=TIMEOUT)
        seen["interrupt_local"] = {"seconds": time.time() - t1, "reply": r["content"],
                                   "control_reply": cr["msg_type"], "outputs": d.collect(msg_id)}

        # Interrupt a local wait on an engine's task: the task stops too.
        msg_id = kc.execute("spin = rc[1]:execute(\"io.open('" + signs + "/spin', 'w'):close() "
                            "while true do end\")\nspin:get()")
        wait_for(lambda: os.path.exists(signs + "/spin"))
        km.interrupt_kernel()
        r = d.reply(msg_id, timeout=10)
        d.collect(msg_id)
        seen["interrupt_wait"] = {"reply": r["content"],
                                  "after": d.run("rc[1]:apply_sync(function() return 'free' end)", timeout=15)}

        # Interrupt local Lua by signal.
        msg_id = kc.execute("io.open('%s/local2', 'w'):close()\nwhile true do end" % signs)
        wait_for(lambda: os.path.exists(signs + "/local2"))
        t1 = time.time()
        km.interrupt_kernel()
        r = d.reply(msg_id, timeout=10)
        seen["interrupt_local_signal"] = {"seconds": time.time() - t1, "reply": r["content"]}
        d.collect(msg_id)
        shutil.rmtree(signs)

        # A forged message: signed with another key. It must not run.
        forger = Session(key=b"not the kernel's key", username="mallory")
        forger.send(kc.shell_channel.socket, "execute_request",
                    {"code": "forged = true", "silent": False, "store_history": True,
                     "user_expressions": {}, "allow_stdin": False})
        # A forged interrupt on the control channel: the relay thread checks
        # the signature before it stops anything, so the cell runs to its end.
        msg_id = kc.execute("local t = os.clock() while os.clock() - t < 0.5 do end\n'finished'")
        forger.send(kc.control_channel.socket, "interrupt_request", {})
        outs = d.collect(msg_id)
        seen["forged_interrupt"] = {"reply": d.reply(msg_id)["content"], "outputs": outs}
        seen["after_forgery"] = d.run("forged == nil")
        seen["forged_ran"] = d.run("forged")

        # Timings: empty cells, request to reply.
        times = []
        for _ in range(50):
            t1 = time.time()
            d.run("")
            times.append(time.time() - t1)
        times.sort()
        seen["empty_cell_p50_ms"] = times[len(times) // 2] * 1000

        t1 = time.time()
        km.shutdown_kernel(now=False)
        seen["shutdown_seconds"] = time.time() - t1
        seen["kernel_alive_after_shutdown"] = km.is_alive()
    finally:
        kc.stop_channels()
        if km.has_kernel and km.is_alive():
            km.shutdown_kernel(now=True)
    print(json.dumps(seen))


def standalone(lpar_dir):
    """%cluster start, %px on it, %cluster list, %cluster stop."""
    os.environ["LPAR_DIR"] = lpar_dir
    seen = {}
    km = KernelManager(kernel_name="lpar")
    km.start_kernel(stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    d = Driver(kc)
    try:
        ready(kc)
        seen["start"] = d.run("%cluster start -n 2 --profile kspec", timeout=60)
        seen["px"] = d.run("%px print('standalone ' .. lpar.engine.id)")
        seen["list"] = d.run("%cluster list")
        seen["stop"] = d.run("%cluster stop --profile kspec", timeout=60)
        seen["after_stop"] = d.run("rc == nil")
        km.shutdown_kernel(now=False)
    finally:
        kc.stop_channels()
        if km.has_kernel and km.is_alive():
            km.shutdown_kernel(now=True)
    print(json.dumps(seen))


def orphan():
    """Start a kernel with engines, report the pids, and die without a word."""
    km = KernelManager(kernel_name="lpar")
    km.start_kernel(stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        ready(kc)
        d = Driver(kc)
        d.run("rc = lpar.Cluster{n = 2}:start_and_connect()")
        r = d.run("print(rc:queue_status()[0].pid, rc:queue_status()[1].pid)")
        pids = [int(p) for p in streams(r).split()]
        print(json.dumps({"kernel_pid": km.provisioner.process.pid, "engine_pids": pids}), flush=True)
    except BaseException:
        km.shutdown_kernel(now=True)
        raise
    os._exit(0)  # no shutdown_request, no kill: the kernel must notice


def notebook(path, out_path):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="lpar", timeout=120, startup_timeout=30)
    t0 = time.time()
    client.execute()
    nbformat.write(nb, out_path)
    cells = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        outs = []
        for o in c.outputs:
            entry = {"type": o.output_type}
            if o.output_type == "stream":
                entry["text"] = o.text
            elif o.output_type in ("execute_result", "display_data"):
                entry["mimes"] = sorted(o.data.keys())
                entry["text"] = o.data.get("text/plain", "")
                if "image/png" in o.data:
                    entry["size"] = png_size(base64.b64decode(o.data["image/png"]))
            elif o.output_type == "error":
                entry["ename"], entry["evalue"] = o.ename, o.evalue
            outs.append(entry)
        cells.append({"source": c.source, "outputs": outs})
    print(json.dumps({"seconds": time.time() - t0, "cells": cells}))


if __name__ == "__main__":
    if sys.argv[1] == "protocol":
        protocol(sys.argv[2])
    elif sys.argv[1] == "orphan":
        orphan()
    elif sys.argv[1] == "standalone":
        standalone(sys.argv[2])
    elif sys.argv[1] == "notebook":
        notebook(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: kernel_client.py protocol LOG | notebook IN OUT")
