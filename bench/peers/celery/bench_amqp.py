"""Celery 5 on RabbitMQ beside kiln's "RabbitMQ intake into durable jobs on PostgreSQL, msgs/s".

Three figures for N no-op tasks, persistent messages on a durable queue of this benchmark's own
(`kiln-peer-celery`, purged before the run and deleted after it; never kiln's `jobs`):
  publish      N apply_async calls, until the broker holds all N (no worker running);
  consume      a prefork worker with acks_late drains them: first to last task *executed*;
  end_to_end   the same worker, already warm, while N more are published: first publish to last
               task executed.
Prints one JSON line on stdout (the worker's output goes to stderr) and always stops the worker.

Named bench_amqp.py, not amqp.py: a module `amqp` in this folder would shadow py-amqp, the
transport itself, for both this script and the worker.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    return p.parse_args()


ARGS = parse_args()
# amqp_tasks reads the broker at import, and the worker inherits it through the environment.
os.environ["KILN_CELERY_AMQP_BROKER"] = ARGS.broker

import celery  # noqa: E402
import kombu  # noqa: E402
import redis  # noqa: E402

import amqp_tasks  # noqa: E402
from amqp_tasks import QUEUE, app, noop  # noqa: E402

KEY = "kiln-peer-celery:amqp"
POLL_S = 0.005
STOP_TIMEOUT_S = 30


def start_worker(concurrency):
    bindir = os.path.dirname(sys.executable)
    exe = os.path.join(bindir, "celery")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "celery"]
    # Gossip, mingle and heartbeats only coordinate several workers; with one they are just
    # broker chatter, and leaving them off is Celery's usual advice for throughput.
    cmd += ["-A", "amqp_tasks", "worker", "-c", str(concurrency), "--pool", "prefork",
            "-Q", QUEUE, "-l", "warning", "--without-gossip", "--without-mingle",
            "--without-heartbeat"]
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Own session, so the pool processes can be stopped as one group by this worker's id.
    return subprocess.Popen(cmd, cwd=HERE, env=env, stdout=sys.stderr, start_new_session=True)


def stop_worker(worker):
    pgid = worker.pid  # session leader: its group id is its pid
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: the pool exits with it
        try:
            worker.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if worker.poll() is None:
        worker.wait(timeout=STOP_TIMEOUT_S)


def queue_depth(channel):
    # Ready messages only (unacked ones are not counted): enough to see the broker hold all
    # that was published while no worker consumes; never used to decide that tasks have run.
    _name, ready, _consumers = channel.queue_declare(queue=QUEUE, passive=True)
    return ready


def publish(n, key):
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async((key, n), producer=producer)


def reset(r, key):
    r.delete(f"{key}:n", f"{key}:first", f"{key}:last")


def wait_all_ran(r, key, worker, deadline):
    """Worker-side stamps (time.time()) of the first and the last executed task."""
    while True:
        last = r.get(f"{key}:last")
        if last is not None:
            return float(r.get(f"{key}:first")), float(last)
        if worker is not None and worker.poll() is not None:
            raise RuntimeError(f"celery worker exited early with status {worker.returncode}")
        if time.monotonic() > deadline:
            done = int(r.get(f"{key}:n") or 0)
            raise RuntimeError(f"only {done} tasks ran before the timeout")
        time.sleep(POLL_S)


def on_sigterm(_signo, _frame):
    raise SystemExit(143)


def main():
    signal.signal(signal.SIGTERM, on_sigterm)
    n = ARGS.tasks
    load_start = os.getloadavg()
    r = redis.Redis.from_url(amqp_tasks.REDIS_URL)
    pub_key, e2e_key = f"{KEY}:consume", f"{KEY}:e2e"
    reset(r, pub_key)
    reset(r, e2e_key)

    conn = app.connection_for_write()
    conn.ensure_connection(max_retries=3)
    channel = conn.default_channel
    # Declaring through the app's own Queue gives exactly the durable queue the worker expects.
    app.amqp.queues[QUEUE](channel).declare()
    channel.queue_purge(QUEUE)
    props = conn.connection.server_properties
    rabbit_version = props.get("version")
    if isinstance(rabbit_version, bytes):
        rabbit_version = rabbit_version.decode()

    worker = None
    try:
        # Publish with no consumer: the rate is the client's until the broker holds all N
        # (without publisher confirms the last apply_async returns before RabbitMQ has them).
        t0 = time.perf_counter()
        publish(n, pub_key)
        t_client = time.perf_counter() - t0
        deadline = time.monotonic() + ARGS.timeout
        while queue_depth(channel) < n:
            if time.monotonic() > deadline:
                raise RuntimeError("broker never held all published tasks")
            time.sleep(POLL_S)
        t_broker = time.perf_counter() - t0

        # Consume the backlog: the clock runs from the first to the last task executed, so the
        # worker's start-up is not counted.
        worker = start_worker(ARGS.concurrency)
        first, last = wait_all_ran(r, pub_key, worker, time.monotonic() + ARGS.timeout)
        consume_s = last - first

        # End to end with the warm worker: N more, published while it consumes.
        start = time.time()
        publish(n, e2e_key)
        t_e2e_client = time.time() - start
        _first, last = wait_all_ran(r, e2e_key, worker, time.monotonic() + ARGS.timeout)
        e2e_s = last - start
        ran = int(r.get(f"{pub_key}:n")), int(r.get(f"{e2e_key}:n"))
    finally:
        if worker is not None:
            stop_worker(worker)
        try:
            channel.queue_purge(QUEUE)
            channel.queue_delete(QUEUE)
            channel.exchange_delete(QUEUE)
        except Exception as e:  # cleanup must not hide the real error
            print(f"cleanup: {e!r}", file=sys.stderr)
        conn.release()
        reset(r, pub_key)
        reset(r, e2e_key)
    load_end = os.getloadavg()

    if ran != (n, n):
        raise RuntimeError(f"expected {n} executions per phase, counted {ran}")
    print(json.dumps({
        "peer": "celery-amqp",
        "celery_version": celery.__version__,
        "kombu_version": kombu.__version__,
        "transport": f"{conn.transport.driver_name} {conn.transport.driver_version()}",
        "rabbitmq_version": rabbit_version,
        "tasks": n,
        "concurrency": ARGS.concurrency,
        "pool": "prefork",
        "acks_late": True,
        "publish_msgs_per_s": round(n / t_broker, 1),
        "publish_client_msgs_per_s": round(n / t_client, 1),
        "consume_msgs_per_s": round(n / consume_s, 1),
        "end_to_end_msgs_per_s": round(n / e2e_s, 1),
        "end_to_end_publish_msgs_per_s": round(n / t_e2e_client, 1),
        "seconds": {"publish": round(t_broker, 3), "consume": round(consume_s, 3),
                    "end_to_end": round(e2e_s, 3)},
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
    }))


if __name__ == "__main__":
    main()
