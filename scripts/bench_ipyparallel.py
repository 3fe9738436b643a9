"""The workloads of scripts/bench.lua, measured with ipyparallel.

Run by `scripts/bench --vs-ipyparallel` with Debian's /usr/bin/python3 (and
python3-ipyparallel, python3-numpy). Prints one line per figure,
    key<TAB>value<TAB>unit
with the same keys as scripts/bench.lua, and `sample<TAB>key<TAB>value` lines
for the latency distribution. Medians; --quick for a smoke run.
"""
import os
import statistics
import sys
import time

import ipyparallel as ipp
import numpy as np

QUICK = "--quick" in sys.argv
SCALE = 0.05 if QUICK else 1


def count(n):
    return max(3, int(n * SCALE))


def emit(key, value, unit):
    print(f"{key}\t{value:.6g}\t{unit}", flush=True)


def pct(values, p):
    values = sorted(values)
    return values[max(0, int(len(values) * p + 0.999999) - 1)]


def start(n):
    cluster = ipp.Cluster(n=n, log_level=40)
    t0 = time.perf_counter()
    rc = cluster.start_and_connect_sync()
    rc.wait_for_engines(n, timeout=120)
    return cluster, rc, time.perf_counter() - t0


def identity(x):
    return x


def main():
    for n in (2, 4) if QUICK else (2, 4):
        cluster, rc, dt = start(n)
        emit(f"start_{n}", dt * 1e3, "ms")
        cluster.stop_cluster_sync()

    cluster, rc, _ = start(4)
    dview, e0 = rc[:], rc[0]
    pids = dview.apply_sync(os.getpid)
    rss = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            rss.append(int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024)
    emit("rss", statistics.median(rss), "MB")

    for key, view, n in (("apply1", e0, count(2000)), ("apply4", dview, count(1000))):
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            view.apply_sync(identity, "")
            t.append((time.perf_counter() - t0) * 1e6)
        emit(f"{key}_p50", pct(t, 0.5), "us")
        emit(f"{key}_p99", pct(t, 0.99), "us")
        if key == "apply1":
            for v in t:
                print(f"sample\t{key}\t{v:.3f}")
            # ipyparallel always goes through its controller, over TCP in the
            # clear: the same figure stands beside lpar's standalone rows.
            for alias in ("standalone_apply1", "tcp_apply1"):
                emit(f"{alias}_p50", pct(t, 0.5), "us")
    for key, view, n in (("exec1", e0, count(2000)), ("exec4", dview, count(1000))):
        t = []
        for _ in range(n):
            t0 = time.perf_counter()
            view.execute("", block=True)
            t.append((time.perf_counter() - t0) * 1e6)
        emit(f"{key}_p50", pct(t, 0.5), "us")
        emit(f"{key}_p99", pct(t, 0.99), "us")

    n = count(2000)
    t0 = time.perf_counter()
    ars = [e0.execute("", block=False) for _ in range(n)]
    rc.wait(ars)
    emit("exec_nb", n / (time.perf_counter() - t0), "/s")

    lb = rc.load_balanced_view()
    n = count(2000)
    t0 = time.perf_counter()
    lb.map_sync(identity, range(n))
    emit("lb_tiny", n / (time.perf_counter() - t0), "/s")

    views = [rc[i] for i in rc.ids]
    n = count(2000)
    t0 = time.perf_counter()
    ars = [views[i % len(views)].apply_async(identity, i) for i in range(n)]
    rc.wait(ars)
    emit("direct_apply_async", n / (time.perf_counter() - t0), "/s")

    size = 1024
    while size <= 256 * 1024:
        a = np.random.random(size)
        t = []
        for _ in range(count(40)):
            t0 = time.perf_counter()
            e0.push({"a": a}, block=True)
            t.append(time.perf_counter() - t0)
        emit(f"push_{size}", size * 8 / statistics.median(t) / 1e9, "GB/s")
        if size == 256 * 1024:  # 2 MiB, through ipyparallel's controller over TCP
            for alias in ("standalone_push_2mib", "tcp_push_2mib"):
                emit(alias, size * 8 / statistics.median(t) / 1e9, "GB/s")
        t = []
        for _ in range(count(40)):
            t0 = time.perf_counter()
            e0.pull("a", block=True)
            t.append(time.perf_counter() - t0)
        emit(f"pull_{size}", size * 8 / statistics.median(t) / 1e9, "GB/s")
        size *= 2
    big = np.random.random(8 * 1024 * 1024)
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        e0.push({"big": big}, block=True)
        t.append(time.perf_counter() - t0)
    emit("push_matrix_64mib", big.nbytes / statistics.median(t) / 1e9, "GB/s")

    for n in ((256, 512) if QUICK else (512, 1024, 2048, 4096)):
        a, b = np.random.random((n, n)), np.random.random((n, n))
        rows = (n + 3) // 4
        t0 = time.perf_counter()
        dview.push({"B": b}, block=True)
        parts = [rc[k].apply_async(lambda x: x @ B, a[k * rows:(k + 1) * rows])  # noqa: F821
                 for k in range(4)]
        c = np.vstack([p.get() for p in parts])
        dt = time.perf_counter() - t0
        assert np.abs(c - a @ b).max() < 1e-8 * n
        emit(f"dgemm_tiled_{n}", 2 * n ** 3 / dt / 1e9, "GFLOP/s")

    rc.close()
    cluster.stop_cluster_sync()


if __name__ == "__main__":
    main()
