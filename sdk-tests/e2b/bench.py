"""The E2B SDK's own calls timed against kiln: create → first command,
command round trip, 1 MiB write + read. Run by `sdk-tests/e2b/bench`.
"""

import os
import statistics
import sys
import time

from e2b import Sandbox


def ms(seconds):
    return round(seconds * 1000, 1)


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    creates = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    first = []
    for _ in range(creates):
        started = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        sbx.commands.run("echo hi")
        first.append(time.perf_counter() - started)
        sbx.kill()
        # The warm pool refills in the background; let it.
        time.sleep(float(os.environ.get("KILN_BENCH_GAP_S", "0")))
    sbx = Sandbox.create(timeout=300)
    sbx.commands.run("true")
    trips = []
    for _ in range(runs):
        started = time.perf_counter()
        sbx.commands.run("echo hi")
        trips.append(time.perf_counter() - started)
    blob = os.urandom(1 << 20)
    files = []
    for _ in range(20):
        started = time.perf_counter()
        sbx.files.write("/tmp/bench.bin", blob)
        back = sbx.files.read("/tmp/bench.bin", format="bytes")
        files.append(time.perf_counter() - started)
        assert bytes(back) == blob
    sbx.kill()
    print(
        f"create->first run: p50 {ms(statistics.median(first))} ms, min {ms(min(first))} ms, "
        f"max {ms(max(first))} ms (n={creates}); "
        f"commands.run round trip: p50 {ms(statistics.median(trips))} ms, p99 {ms(pct(trips, 0.99))} ms (n={runs}); "
        f"files.write+read 1 MiB: p50 {ms(statistics.median(files))} ms (n=20)"
    )


if __name__ == "__main__":
    main()
