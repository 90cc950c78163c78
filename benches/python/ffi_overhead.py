"""FFI call overhead of the Python bindings, against baselines measured in
the same run:

* a trivial synchronous method, `MeshNode.is_connected()` (a lock and a
  bool), against a plain Python method returning a bool;
* a synchronous method returning a string, `MeshNode.fingerprint()`,
  against a plain Python method returning a string;
* an async method, `await MeshNode.status()` (a record built on the
  node's side), against a plain Python `async def` awaited the same way;
* an async method that runs on the node's own runtime,
  `await MeshNode.discover(0)` (a task spawned and joined across runtimes).

Run by benches/python/run.sh against the release-ffi library (LTO). Prints
one line per measurement: mean per call over ROUNDS rounds of N calls, the
best round, and the ratio to its baseline.
"""

import asyncio
import statistics
import sys
import tempfile
import time

import mesh_ffi as m

ROUNDS = 7


class PyNode:
    def is_connected(self):
        return False

    def fingerprint(self):
        return "ABCD-EFGH-IJKL"

    async def status(self):
        return ("id", "fp", True)


def time_sync(fn, n):
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter_ns() - start) / n)
    return rounds


def time_async(make, n):
    async def body():
        rounds = []
        for _ in range(ROUNDS):
            start = time.perf_counter_ns()
            for _ in range(n):
                await make()
            rounds.append((time.perf_counter_ns() - start) / n)
        return rounds

    return asyncio.run(body())


def report(name, rounds, base):
    mean, best = statistics.mean(rounds), min(rounds)
    base_mean = statistics.mean(base)
    print(
        f"{name:<42} mean {mean / 1e3:8.2f} µs  best {best / 1e3:8.2f} µs  "
        f"baseline {base_mean / 1e3:7.3f} µs  ratio {mean / base_mean:7.1f}x  "
        f"overhead {(mean - base_mean) / 1e3:7.2f} µs"
    )


def main():
    quick = "--quick" in sys.argv
    n_sync, n_async = (2_000, 500) if quick else (200_000, 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        o = m.default_options(m.NodeRole.WORKER, tmp)
        o.listen_addr = "127.0.0.1:0"
        o.mdns = False
        node = m.MeshNode(o)
        node.start()
        py = PyNode()
        print(f"# {ROUNDS} rounds; {n_sync} sync calls, {n_async} async calls per round")
        report("sync  MeshNode.is_connected()", time_sync(node.is_connected, n_sync), time_sync(py.is_connected, n_sync))
        report("sync  MeshNode.fingerprint()", time_sync(node.fingerprint, n_sync), time_sync(py.fingerprint, n_sync))
        py_async = time_async(py.status, n_async)
        report("async await MeshNode.status()", time_async(node.status, n_async), py_async)
        report("async await MeshNode.discover(0)", time_async(lambda: node.discover(0), n_async), py_async)
        asyncio.run(node.stop())


if __name__ == "__main__":
    main()
