"""Celery 5 on Redis beside `kiln bench pipeline`: a chain of 1,000 no-op tasks (overhead per
step) and a chord of 1,000 no-op tasks with a no-op callback (fan-out + fan-in).

Starts its own 4-process prefork worker, one warm-up then three timed runs of each shape,
prints a table and one JSON line, and always stops the worker (and its pool) on the way out.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import celery  # noqa: E402
import redis  # noqa: E402
from celery import chain, chord  # noqa: E402

import tasks  # noqa: E402  (also raises the recursion limit, see tasks.py)

STEPS = 1_000
RUNS = 3
RESULT_TIMEOUT_S = 600
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30


def start_worker():
    bindir = os.path.dirname(sys.executable)
    exe = os.path.join(bindir, "celery")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "celery"]
    cmd += ["-A", "tasks", "worker", "-c", "4", "--pool", "prefork", "-l", "warning"]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Own session, so the pool processes can be stopped as one group by this worker's id.
    # Its banner goes to stderr so stdout holds only the table and the JSON line.
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=sys.stderr, start_new_session=True)


def wait_ready(worker):
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"celery worker exited early with status {worker.returncode}")
        if tasks.app.control.ping(timeout=1.0):
            return
    raise RuntimeError(f"celery worker did not answer ping within {READY_TIMEOUT_S} s")


def stop_worker(worker):
    pgid = worker.pid  # session leader: its group id is its pid
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the pool exits with it
        try:
            worker.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left in the worker's group (a stuck main process or orphaned pool children).
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if worker.poll() is None:
        worker.wait(timeout=STOP_TIMEOUT_S)


def time_chain():
    sig = chain(tasks.noop.si() for _ in range(STEPS))
    t = time.perf_counter()
    res = sig.apply_async()
    res.get(timeout=RESULT_TIMEOUT_S)
    return time.perf_counter() - t


def time_chord():
    sig = chord((tasks.noop.si() for _ in range(STEPS)), tasks.noop.si())
    t = time.perf_counter()
    res = sig.apply_async()
    res.get(timeout=RESULT_TIMEOUT_S)
    return time.perf_counter() - t


def measure(fn):
    fn()  # warm-up
    return [fn() for _ in range(RUNS)]


def summary(values, digits):
    return {
        "runs": [round(v, digits) for v in values],
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
    }


def on_sigterm(_signo, _frame):
    raise SystemExit(143)


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    r = redis.Redis.from_url(tasks.REDIS_URL)
    r.flushdb()
    server = r.info("server").get("redis_version", "?")
    load_before = os.getloadavg()
    worker = start_worker()
    try:
        wait_ready(worker)
        chain_s = measure(time_chain)
        chord_s = measure(time_chord)
    finally:
        stop_worker(worker)
        try:
            r.flushdb()
        except redis.RedisError:
            pass
    load_after = os.getloadavg()

    chain_ms = [s * 1000.0 / STEPS for s in chain_s]
    print(f"Celery {celery.__version__} on Redis {server}, prefork worker -c 4, "
          f"loadavg(1m) {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print("| what | " + " | ".join(f"run {i + 1}" for i in range(RUNS)) + " | min | median |")
    print("|---|" + "---|" * (RUNS + 2))
    rows = [
        (f"chain of {STEPS:,} no-op tasks, s", chain_s, 3),
        (f"chain of {STEPS:,}, ms per step", chain_ms, 3),
        (f"chord of {STEPS:,} + callback, s", chord_s, 3),
    ]
    for name, vals, d in rows:
        cells = " | ".join(f"{v:.{d}f}" for v in vals)
        print(f"| {name} | {cells} | {min(vals):.{d}f} | {statistics.median(vals):.{d}f} |")
    print(json.dumps({
        "peer": "celery",
        "version": celery.__version__,
        "chain_1000_ms_per_step": summary(chain_ms, 3),
        "chord_1000_s": summary(chord_s, 3),
        "chain_1000_s": summary(chain_s, 3),
        "redis_version": server,
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
    }))


if __name__ == "__main__":
    main()
