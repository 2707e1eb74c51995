// Graphile Worker beside `kiln bench queue`: enqueue 100k no-op jobs, drain
// them, then enqueue→start latency at light load. Same PostgreSQL, fresh schema.
// Usage: DATABASE_URL=postgres://... JOBS=100000 CONCURRENCY=100 BATCHED=1 node bench.mjs
import { run, makeWorkerUtils, Logger } from "graphile-worker";

const connectionString = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";
const jobs = Number(process.env.JOBS ?? 100000);
const concurrency = Number(process.env.CONCURRENCY ?? 100);
const batched = process.env.BATCHED === "1";
const samples = Number(process.env.SAMPLES ?? 500);
const schema = `gw_bench_${Date.now()}`;
// Per-job INFO lines would dominate the measurement; keep errors only.
const logger = new Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

const utils = await makeWorkerUtils({ connectionString, schema, logger });
await utils.migrate();

let t = performance.now();
for (let i = 0; i < jobs; i += 1000) {
  const n = Math.min(1000, jobs - i);
  await utils.addJobs(Array.from({ length: n }, () => ({ identifier: "noop", payload: {} })));
}
const enqueueSeconds = (performance.now() - t) / 1000;

let done = 0;
let allDone;
const finished = new Promise((resolve) => (allDone = resolve));
let started = new Map();
const preset = batched
  ? { worker: { localQueue: { size: concurrency + 1 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 } }
  : undefined;
const runner = await run({
  connectionString,
  schema,
  concurrency,
  noHandleSignals: true,
  logger,
  pollInterval: 1000,
  preset,
  taskList: {
    noop: async () => {
      if (++done === jobs) allDone();
    },
    probe: async (payload) => {
      started.set(payload.n, performance.now());
    },
  },
});
t = performance.now();
await finished;
const drainSeconds = (performance.now() - t) / 1000;

const latencies = [];
for (let n = 0; n < samples; n++) {
  const sent = performance.now();
  await utils.addJob("probe", { n });
  while (!started.has(n)) await new Promise((r) => setImmediate(r));
  latencies.push(started.get(n) - sent);
  await new Promise((r) => setTimeout(r, 2));
}
latencies.sort((a, b) => a - b);
const pct = (p) => latencies[Math.min(latencies.length - 1, Math.round((latencies.length - 1) * p))].toFixed(3);

console.log(`| graphile-worker 0.17.3 (${batched ? "localQueue + batched completion" : "default options"}), concurrency ${concurrency} | value |`);
console.log(`|---|---|`);
console.log(`| enqueue ${jobs} jobs (addJobs, batches of 1,000) | ${(jobs / enqueueSeconds).toFixed(0)} jobs/s |`);
console.log(`| drain ${jobs} no-op jobs | ${(jobs / drainSeconds).toFixed(0)} jobs/s (${drainSeconds.toFixed(2)} s) |`);
console.log(`| enqueue→start, light load (${samples} samples) | p50 ${pct(0.5)} ms · p99 ${pct(0.99)} ms |`);

await runner.stop();
await utils.release();
