"""Celery app for the kiln RabbitMQ-intake peer benchmark: RabbitMQ broker, no result backend.

Imported by both amqp.py (publisher) and the worker it starts (`celery -A amqp_tasks worker`);
the broker URL reaches the worker through KILN_CELERY_AMQP_BROKER.
"""
import os
import time

from celery import Celery
from kombu import Exchange, Queue

BROKER_URL = os.environ.get("KILN_CELERY_AMQP_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
# Its own queue: kiln's intake consumes `jobs`, which this benchmark must never touch.
QUEUE = "kiln-peer-celery"
# Redis only counts executed tasks; it is not a Celery backend. Same database as the Redis peer.
REDIS_DB = int(os.environ.get("KILN_CELERY_REDIS_DB", "9"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"

app = Celery("amqp_tasks", broker=BROKER_URL, backend=None)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    # A durable classic queue with persistent messages (delivery_mode 2, Celery's default):
    # the same durability kiln's `jobs` queue has.
    task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct", durable=True),
                       routing_key=QUEUE, durable=True)],
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    task_default_delivery_mode=2,
    # Ack only after the task ran, as kiln acks only after the job is stored in PostgreSQL.
    task_acks_late=True,
    task_ignore_result=True,
    # Prefetch stays at Celery's default (4 x concurrency unacked messages in flight).
)

_redis = None


def _r():
    # Opened lazily in each pool process, so no connection is shared across fork.
    global _redis
    if _redis is None:
        import redis
        _redis = redis.Redis.from_url(REDIS_URL)
    return _redis


@app.task(ignore_result=True, acks_late=True)
def noop(key, total):
    # The only work: count the execution, and stamp the first and the last one, so the
    # benchmark ends when every task has run (not when it was merely delivered).
    now = time.time()
    r = _r()
    n = r.incr(f"{key}:n")
    if n == 1:
        r.set(f"{key}:first", repr(now))
    if n == total:
        r.set(f"{key}:last", repr(time.time()))
