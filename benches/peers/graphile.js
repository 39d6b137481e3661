// graphile-worker at its documented performance preset, draining a backlog of N jobs
// whose task does one INSERT of the job's payload into a sink table.
//
//     node graphile.js N [connection-string]
//
// Connection: the argument, else DATABASE_URL, else the libpq variables (PGHOST,
// PGPORT, PGUSER, PGPASSWORD, PGDATABASE) that node-postgres reads itself.
//
// Steps: drops and recreates the `graphile_worker` schema (graphile-worker's own
// migrations) and the sink table `peer_sink`; enqueues N jobs in one set-based
// `graphile_worker.add_jobs` call; VACUUM ANALYZE and CHECKPOINT (as the chronicle
// drain does before each run); then starts the worker and times from just before
// `run()` to the moment the job table is seen empty after the N-th job completed
// (completions are batched, so the last batch's commit is inside the time). Checks
// that the sink holds N rows, stops the worker, and prints one JSON line on stdout:
// {"jobs":N,"seconds":S,"rate":R,"sink_rows":M}. Progress and errors go to stderr.
"use strict";

// Set before graphile-worker is loaded: it reads this once. Without it every job
// writes an info line, which would measure the console rather than the queue.
process.env.NO_LOG_SUCCESS = "1";

const { EventEmitter } = require("events");
const pg = require("pg");
const { run, runMigrations, Logger } = require("graphile-worker");

// The preset of graphile-worker's performance page (worker.graphile.org/docs/performance).
const PRESET = {
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
  // The default; the backlog exists before start, so polling only matters at the end.
  pollInterval: 2000,
};

const TASK = "peer_insert";

// Warnings and errors only.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    process.stderr.write(`graphile-worker ${level}: ${message}\n`);
  }
});

function fail(msg) {
  process.stderr.write(`graphile.js: ${msg}\n`);
  process.exit(1);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function main() {
  const jobs = Number.parseInt(process.argv[2] ?? process.env.PEER_JOBS ?? "", 10);
  if (!Number.isInteger(jobs) || jobs < 1) {
    fail("usage: node graphile.js N [connection-string] (N: jobs, at least 1)");
  }
  const connectionString = process.argv[3] || process.env.DATABASE_URL || undefined;
  const poolConfig = connectionString ? { connectionString } : {};

  const admin = new pg.Client(poolConfig);
  await admin.connect();
  await admin.query("DROP SCHEMA IF EXISTS graphile_worker CASCADE");
  await admin.query("DROP TABLE IF EXISTS peer_sink");
  await admin.query("CREATE TABLE peer_sink (job_id bigint PRIMARY KEY, payload json NOT NULL)");

  const pgPool = new pg.Pool({ ...poolConfig, max: PRESET.maxPoolSize });
  pgPool.on("error", (e) => logger.error(`idle client: ${e.message}`));
  pgPool.on("connect", (client) => client.on("error", (e) => logger.error(`client: ${e.message}`)));
  await runMigrations({ pgPool, logger });

  // The backlog, in one statement, before the worker starts.
  const added = await admin.query(
    `SELECT count(*)::int AS n FROM graphile_worker.add_jobs(
       ARRAY(SELECT ROW($1, json_build_object('n', g), NULL, NULL, NULL, NULL, NULL, NULL)::graphile_worker.job_spec
             FROM generate_series(1, $2::int) g))`,
    [TASK, jobs],
  );
  if (added.rows[0].n !== jobs) {
    fail(`add_jobs enqueued ${added.rows[0].n} jobs, expected ${jobs}`);
  }
  await admin.query("VACUUM ANALYZE graphile_worker._private_jobs, peer_sink");
  await admin.query("CHECKPOINT").catch(() => {});

  const events = new EventEmitter();
  let succeeded = 0;
  let settle;
  const done = new Promise((resolve, reject) => {
    settle = { resolve, reject };
  });
  events.on("job:success", () => {
    succeeded += 1;
    if (succeeded === jobs) settle.resolve();
  });
  // Any failure ends the run: a retried job would not be one INSERT per job.
  events.on("job:error", ({ error }) => settle.reject(new Error(`a job failed: ${error}`)));

  const taskList = {
    [TASK]: async (payload, helpers) => {
      await helpers.query("INSERT INTO peer_sink (job_id, payload) VALUES ($1, $2)", [
        helpers.job.id,
        JSON.stringify(payload),
      ]);
    },
  };

  const started = process.hrtime.bigint();
  const runner = await run({
    pgPool,
    logger,
    events,
    taskList,
    noHandleSignals: true,
    preset: { worker: PRESET },
  });
  try {
    await done;
  } catch (e) {
    await runner.stop();
    throw e;
  }
  // Completion is batched: wait until its last batch is committed.
  for (;;) {
    const r = await admin.query("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs) AS left");
    if (!r.rows[0].left) break;
    await sleep(2);
  }
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await runner.stop();

  const sink = await admin.query("SELECT count(*)::int AS n FROM peer_sink");
  const sinkRows = sink.rows[0].n;
  await admin.end();
  await pgPool.end();
  if (sinkRows !== jobs) {
    fail(`the sink holds ${sinkRows} rows, expected ${jobs}`);
  }
  process.stdout.write(
    `${JSON.stringify({ jobs, seconds, rate: jobs / seconds, sink_rows: sinkRows })}\n`,
  );
}

main().catch((e) => fail(e && e.stack ? e.stack : String(e)));
