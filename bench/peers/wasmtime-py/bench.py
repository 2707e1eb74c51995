"""The wasmtime Python embedding beside `kiln bench wasm`: instantiate + _start
of the same hello-world module, timed per run (pip install wasmtime)."""
import statistics
import sys
import time

import wasmtime

wat = open(sys.argv[1]).read()
engine = wasmtime.Engine()
module = wasmtime.Module(engine, wat)
linker = wasmtime.Linker(engine)
linker.define_wasi()


def run_once():
    store = wasmtime.Store(engine)
    config = wasmtime.WasiConfig()
    store.set_wasi(config)
    instance = linker.instantiate(store, module)
    instance.exports(store)["_start"](store)


for _ in range(200):
    run_once()
samples = []
for _ in range(5000):
    t = time.perf_counter()
    run_once()
    samples.append(time.perf_counter() - t)
samples.sort()
print(f"| peer: wasmtime-py {wasmtime.__version__ if hasattr(wasmtime, '__version__') else ''} instantiate + _start (5000 runs) "
      f"| p50 {samples[len(samples)//2]*1e6:.1f} µs · p99 {samples[int(len(samples)*0.99)]*1e6:.1f} µs |")
