"""Hooks for the API fuzz in .ci/run.

Modules are raw bytes and are sent as such. A request that waits for its job
(`?wait=true`, `/run`) may hold for up to `wait_ms` (60 s by default, 10 min
at most) while fuzzed jobs that sleep fill the worker's slots: that is the
long poll working, not a hang, so the fuzz caps its waits at 2 s and keeps
the client's timeout for real hangs. Log follows (`follow=true`) stream
until the client leaves, so the fuzz reads pages instead.
"""

import schemathesis

WAIT_MS_MAX = 2000
FOLLOWED = ("/api/v1/logs", "/api/v1/jobs/{id}/logs")

schemathesis.serializer.alias("application/wasm", "application/octet-stream")


@schemathesis.hook
def map_query(context, query):
    operation = context.operation
    if operation is not None and operation.path in FOLLOWED:
        query = dict(query or {})
        query.pop("follow", None)
        return query
    if operation is None or operation.path not in ("/api/v1/jobs", "/api/v1/run"):
        return query
    if operation.method.upper() != "POST":
        return query
    query = dict(query or {})
    wait_ms = query.get("wait_ms")
    if not isinstance(wait_ms, int) or not 0 <= wait_ms <= WAIT_MS_MAX:
        query["wait_ms"] = WAIT_MS_MAX
    return query
