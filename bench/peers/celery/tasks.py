"""Celery app for the kiln pipeline peer benchmark: Redis as broker and result backend."""
import os
import sys

from celery import Celery

# A dedicated database, flushed by bench.py before each run, keeps the benchmark's keys apart.
REDIS_DB = int(os.environ.get("KILN_CELERY_REDIS_DB", "9"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"

# Long chains are recursive structures: each link's AsyncResult holds its parent, and nested
# chains/signatures (de)serialise recursively. With Celery 5.7 the message of a 1,000-link chain
# carries the remaining links as a flat list and fits Python's default limit of 1,000 frames, but
# anything that walks the result's parents (e.g. `as_tuple()` to store or pass the result) raises
# RecursionError at the default limit. Raising the limit is the usual remedy among Celery users;
# this module is imported by both client and worker, so setting it here covers both.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))

app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task
def noop(*_args, **_kwargs):
    return None
