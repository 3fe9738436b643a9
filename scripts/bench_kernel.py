"""The Jupyter kernel's figures, beside ipykernel's in the same run.

    /usr/bin/python3 scripts/bench_kernel.py [--quick]

Installs the lpar kernelspec under a temporary prefix (from ./build/lpar) and
measures, with jupyter_client, for lpar and for ipykernel (Debian's python3
kernelspec): kernel start to the first kernel_info reply (median of 5 starts),
and an empty cell's execute_request to execute_reply (p50, p99). Then what
`%timeit dview:execute("")` reports in the lpar kernel, beside the same line
at `lpar -n 4`'s prompt through lpar.timeit in a script. Medians from one
run: the machine is shared, so read ratios, not absolutes.
"""
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time

from jupyter_client import KernelManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--quick" in sys.argv


def start(name):
    km = KernelManager(kernel_name=name)
    t0 = time.perf_counter()
    km.start_kernel(stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    while True:  # as wait_for_ready does, with a short poll
        msg_id = kc.kernel_info()
        try:
            while True:
                r = kc.get_shell_msg(timeout=0.05)
                if r["parent_header"].get("msg_id") == msg_id:
                    dt = time.perf_counter() - t0
                    iopub_ready(kc)
                    return km, kc, dt
        except queue.Empty:
            if time.perf_counter() - t0 > 30:
                km.shutdown_kernel(now=True)
                raise TimeoutError("%s did not answer kernel_info in 30 s" % name)


def iopub_ready(kc):
    """A SUB socket misses what was published before its subscription got
    through: ask kernel_info until its idle status comes on iopub too."""
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        msg_id = kc.kernel_info()
        try:
            while True:
                m = kc.get_iopub_msg(timeout=0.2)
                if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                        and m["content"]["execution_state"] == "idle"):
                    return
        except queue.Empty:
            continue
    raise TimeoutError("iopub never carried a status")


def stop(km, kc):
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def execute(kc, code, timeout=30):
    msg_id = kc.execute(code)
    outs = []
    while True:
        m = kc.get_iopub_msg(timeout=timeout)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            outs.append(m["content"]["text"])
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    while kc.get_shell_msg(timeout=timeout)["parent_header"].get("msg_id") != msg_id:
        pass
    return "".join(outs)


def empty_cells(kc, n):
    times = []
    for _ in range(n):
        msg_id = kc.execute("")
        t0 = time.perf_counter()
        while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
            pass
        times.append(time.perf_counter() - t0)
        # the idle status comes after the reply: drain it before the next cell
        while True:
            m = kc.get_iopub_msg(timeout=30)
            if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                    and m["content"]["execution_state"] == "idle"):
                break
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99) - 1]


def main():
    prefix = tempfile.mkdtemp()
    subprocess.run([os.path.join(ROOT, "build", "lpar"), "kernel", "install", "--prefix", prefix],
                   check=True, stdout=subprocess.DEVNULL)
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    starts, cells = (2, 50) if QUICK else (5, 500)
    print("%-10s %22s %20s %20s" % ("kernel", "start to kernel_info", "empty cell p50", "empty cell p99"))
    for name in ["lpar", "python3"]:
        t = []
        for _ in range(starts):
            km, kc, dt = start(name)
            t.append(dt)
            stop(km, kc)
        km, kc, _ = start(name)
        try:
            p50, p99 = empty_cells(kc, cells)
        finally:
            stop(km, kc)
        print("%-10s %19.1f ms %17.3f ms %17.3f ms" % (name, statistics.median(t) * 1e3, p50 * 1e3, p99 * 1e3))
    km, kc, _ = start("lpar")
    try:
        execute(kc, "rc = lpar.Cluster{n = 4}:start_and_connect()\ndview = rc:view()\ndview.block = true")
        line = execute(kc, '%timeit dview:execute("")').strip()
    finally:
        stop(km, kc)
    script = ('local lpar = require "lpar" local rc <close> = lpar.Cluster{n = 4}:start_and_connect() '
              'local dview = rc:view() dview.block = true lpar.timeit(function() dview:execute("") end)')
    here = subprocess.run([os.path.join(ROOT, "build", "lpar"), "-e", script], check=True,
                          capture_output=True, text=True).stdout.strip()
    print('%%timeit dview:execute("") in the lpar kernel: %s' % line)
    print('lpar.timeit of the same, in a script:        %s' % here)
    subprocess.run(["rm", "-rf", prefix], check=False)


if __name__ == "__main__":
    main()
