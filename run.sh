#!/usr/bin/env bash
# chronicle developer tasks for Linux / WSL / macOS.
# run.ps1 is the line-by-line PowerShell mirror: same verbs, same order, same messages.
# Usage: ./run.sh <verb> [args...]     (./run.sh help lists the verbs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# The runbook's devtest database (section 6.2): port 5435, user/password wordloom, database wordloom_test.
DEV_DB_PORT=5435
DEV_DB_NAME=wordloom_test
DEV_DB_USER=wordloom
DEV_DB_PASSWORD=wordloom
DEV_DATABASE_URL="postgresql+psycopg://$DEV_DB_USER:$DEV_DB_PASSWORD@localhost:$DEV_DB_PORT/$DEV_DB_NAME"
# The demo's own database on 127.0.0.1:5432 (CHRONICLE_DEMO_DB picks another name).
DEMO_DB_NAME="${CHRONICLE_DEMO_DB:-chronicle_demo}"
DEMO_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DEMO_DB_NAME"
# The runbook's Docker container (docker-compose name): reused when Docker has it.
RUNBOOK_CONTAINER=wordloom-devtest-db_devtest-1
# CHRONICLE_BIN=path: use that binary, build nothing (relative paths start at the repository).
BIN="${CHRONICLE_BIN:-${CARGO_TARGET_DIR:-target}/release/chronicle}"

usage() {
  cat <<'EOF'
usage: ./run.sh <verb> [args...]

verbs:
  help       show this list (also -h, --help)
  build      cargo build --release
  test       cargo test [args...]: unit, integration and doc tests (the tests find or start a PostgreSQL themselves)
  check-all  the external checks: promtool + Prometheus tests (installed if missing), chronicle.exe under Wine, the container image
             (alert rules, dashboard, a live scrape by a real Prometheus; see monitoring/README.md)
  migrate    build, then chronicle migrate [args...] on DATABASE_URL (unset: the dev database)
  worker     build, then chronicle worker [args...] with the runbook's OUTBOX_* values as defaults
  db-start   start the dev PostgreSQL: 127.0.0.1:5435, user/password wordloom, database wordloom_test
  db-stop    stop the dev PostgreSQL (its data stays; db-destroy removes it)
  db-destroy stop the dev PostgreSQL and delete its data folder for good (--yes to confirm; a Docker
             container is left to docker rm)
  demo       migrate, inject 5000 events into its database, run the worker for 5 s, show the results
             (DATABASE_URL, else database chronicle_demo on 127.0.0.1:5432, else the dev database)
  smoke      the runbook's smoke run: dev database, migrate, worker for 2 s, the acceptance queries;
             exits 1 when anything is off (see docs/operations.md). When nothing is pending it injects
             100 synthetic events: into a DATABASE_URL other than the dev database only with --yes
  monitoring a local Prometheus with monitoring/alerts.yml scraping the local worker, in the foreground
             (PROMETHEUS_PORT, default 9090 or the next free port; OUTBOX_METRICS_PORT, default 9110)

environment:
  DATABASE_URL    the database of migrate, worker, demo and smoke (then no dev database is started)
  CHRONICLE_BIN   a chronicle binary to use instead of building target/release/chronicle
  CHRONICLE_DEMO_DB     the demo's database name on 127.0.0.1:5432 (default chronicle_demo)
  CHRONICLE_SMOKE_WRITE 1: as smoke --yes (for CI, which has no one to ask)
EOF
}

# ---------------------------------------------------------------- helpers

die() { echo "error: $*" >&2; exit 1; }

# Hide the password of any URL in what we print: scheme://user:***@host
mask() { sed -E 's#(://[^:/@]*:)[^@/]*@#\1***@#g' <<<"$*"; }

# Print a command as one could paste it: plain words bare, anything else in single quotes.
show() {
  local out="" a q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@+,%-]+$ ]]; then out+="$a "; else out+="'${a//$q/$q\\$q$q}' "; fi
  done
  echo "==> $(mask "${out% }")"
}

# Print a command, then run it; set -e stops the script if it fails.
step() { show "$@"; "$@"; }

# Run a command without output; only its exit status counts.
quiet() { "$@" >/dev/null 2>&1; }

# SQLAlchemy URLs (postgresql+psycopg://...) -> libpq URLs that psql understands.
libpq_url() { sed -E 's#^postgresql\+[A-Za-z0-9_]+://#postgresql://#' <<<"$1"; }

# Does anything listen on host:port?
tcp_open() { ( exec 3<>"/dev/tcp/$1/$2" ) 2>/dev/null; }

# Does a PostgreSQL accept connections on host:port?
pg_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    quiet pg_isready -q -h "$1" -p "$2"
  else
    tcp_open "$1" "$2"
  fi
}

# Directory holding initdb and pg_ctl: the version matching an existing cluster ($1),
# else pg_config --bindir, else the newest /usr/lib/postgresql/*/bin, else PATH.
find_pg_bindir() {
  local want="${1:-}" d cands=()
  if [[ -n "$want" && -x "/usr/lib/postgresql/$want/bin/pg_ctl" ]]; then
    echo "/usr/lib/postgresql/$want/bin"; return 0
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return 0; fi
  fi
  for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then cands+=("$d"); fi
  done
  if (( ${#cands[@]} > 0 )); then printf '%s\n' "${cands[@]}" | sort -V | tail -n 1; return 0; fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"; return 0
  fi
  return 1
}

# psql from PATH, else from the server binaries.
find_psql() {
  local d
  if command -v psql >/dev/null 2>&1; then command -v psql; return 0; fi
  if d="$(find_pg_bindir)" && [[ -x "$d/psql" ]]; then echo "$d/psql"; return 0; fi
  return 1
}

# initdb refuses to run as root: then the cluster belongs to the postgres OS user,
# in a folder it can reach (one per checkout), instead of .devdb/ in the repository.
devdb_dir() {
  if (( EUID == 0 )); then
    echo "/tmp/chronicle-devdb-$(printf '%s' "$ROOT" | cksum | cut -d' ' -f1)"
  else
    echo "$ROOT/.devdb"
  fi
}

# Run a server command as the cluster's owner (the postgres OS user when we are root).
as_owner() {
  if (( EUID != 0 )); then "$@"; return; fi
  if command -v runuser >/dev/null 2>&1; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && su postgres -s /bin/bash -c "$(printf '%q ' "$@")")
  fi
}

owner_step() {
  if (( EUID == 0 )); then show runuser -u postgres -- "$@"; else show "$@"; fi
  as_owner "$@"
}

# cargo build --release, unless CHRONICLE_BIN names the binary to use.
build_release() {
  if [[ -n "${CHRONICLE_BIN:-}" ]]; then
    [[ -f "$BIN" && -x "$BIN" ]] || die "CHRONICLE_BIN=$BIN is not an executable file"
    echo "    CHRONICLE_BIN=$BIN: using it, not building"
    return 0
  fi
  step cargo build --release
}

# DATABASE_URL from the environment, else the dev database (./run.sh db-start).
use_database_url() {
  if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "    DATABASE_URL from the environment: $(mask "$DATABASE_URL")"
  else
    export DATABASE_URL="$DEV_DATABASE_URL"
    echo "    DATABASE_URL is not set; using the dev database (./run.sh db-start): $DEV_DATABASE_URL"
  fi
}

# The runbook's worker variables; each one is exported only when not already set.
# $1: the metrics port default (9110; the demo uses 0 to avoid port clashes).
worker_defaults() {
  export OUTBOX_WORKER_ID="${OUTBOX_WORKER_ID:-c1}"
  export OUTBOX_METRICS_PORT="${OUTBOX_METRICS_PORT:-$1}"
  export OUTBOX_BATCH_SIZE="${OUTBOX_BATCH_SIZE:-50}"
  export OUTBOX_POLL_INTERVAL_SECONDS="${OUTBOX_POLL_INTERVAL_SECONDS:-0.2}"
  export OUTBOX_LEASE_SECONDS="${OUTBOX_LEASE_SECONDS:-30}"
  export OUTBOX_MAX_ATTEMPTS="${OUTBOX_MAX_ATTEMPTS:-10}"
  export OUTBOX_BASE_BACKOFF_SECONDS="${OUTBOX_BASE_BACKOFF_SECONDS:-0.5}"
  export OUTBOX_MAX_BACKOFF_SECONDS="${OUTBOX_MAX_BACKOFF_SECONDS:-30}"
  export OUTBOX_RECLAIM_INTERVAL_SECONDS="${OUTBOX_RECLAIM_INTERVAL_SECONDS:-5}"
  export OUTBOX_MAX_PROCESSING_SECONDS="${OUTBOX_MAX_PROCESSING_SECONDS:-600}"
  local v line="   "
  for v in OUTBOX_WORKER_ID OUTBOX_METRICS_PORT OUTBOX_BATCH_SIZE OUTBOX_POLL_INTERVAL_SECONDS \
           OUTBOX_LEASE_SECONDS OUTBOX_MAX_ATTEMPTS OUTBOX_BASE_BACKOFF_SECONDS \
           OUTBOX_MAX_BACKOFF_SECONDS OUTBOX_RECLAIM_INTERVAL_SECONDS \
           OUTBOX_MAX_PROCESSING_SECONDS OUTBOX_RUN_SECONDS; do
    if [[ -n "${!v:-}" ]]; then line+=" $v=${!v}"; fi
  done
  echo "$line"
}

# Does the devtest database on 127.0.0.1:5435 accept the runbook's user and password?
# Without psql nobody can ask: then yes, and `chronicle migrate` will say if it is not.
dev_db_answers() {
  local psql
  if ! psql="$(find_psql)"; then
    echo "    psql is not installed to check who answers on 127.0.0.1:$DEV_DB_PORT; assuming the runbook's database"
    return 0
  fi
  PGPASSWORD="$DEV_DB_PASSWORD" quiet "$psql" -X -w -h 127.0.0.1 -p "$DEV_DB_PORT" \
    -U "$DEV_DB_USER" -d "$DEV_DB_NAME" -c 'select 1'
}

# The state of the runbook's Docker container (running, exited, ...); nothing when Docker
# is not running here or has no such container.
container_state() {
  if command -v docker >/dev/null 2>&1 && quiet docker info; then
    docker ps -a --filter "name=^${RUNBOOK_CONTAINER}\$" --format '{{.State}}' 2>/dev/null || true
  fi
}

# The runbook's Docker container, when Docker runs and has it: started when stopped (unless
# something else holds the port), then waited for. Returns 1 when it is not there to use.
use_runbook_container() {
  local state i ready=""
  state="$(container_state)"
  [[ -n "$state" ]] || return 1
  echo "    docker has the runbook's container $RUNBOOK_CONTAINER ($state)"
  if [[ "$state" != running ]]; then
    if tcp_open 127.0.0.1 "$DEV_DB_PORT"; then
      echo "    port $DEV_DB_PORT is held by another server; not starting the container"
      return 1
    fi
    step docker start "$RUNBOOK_CONTAINER"
  fi
  echo "==> waiting for the container to accept connections"
  # Over TCP inside the container: the image's first-start initialisation listens on the socket only.
  for (( i = 0; i < 60; i++ )); do
    if quiet docker exec "$RUNBOOK_CONTAINER" pg_isready -q -h 127.0.0.1 -p 5432 -U "$DEV_DB_USER" -d "$DEV_DB_NAME"; then
      ready=1; break
    fi
    sleep 1
  done
  if [[ -z "$ready" ]]; then
    docker logs --tail 20 "$RUNBOOK_CONTAINER" >&2 || true
    die "the runbook's container $RUNBOOK_CONTAINER does not accept connections (docker logs $RUNBOOK_CONTAINER)"
  fi
  echo "dev database running (docker container $RUNBOOK_CONTAINER)"
  echo "DATABASE_URL=$DEV_DATABASE_URL"
}

# promtool and prometheus on PATH: installed from the Debian package prometheus when missing
# (it gives both), else the run fails saying what to install.
ensure_prometheus() {
  local tool missing=() sudo=()
  for tool in promtool prometheus; do
    if command -v "$tool" >/dev/null 2>&1; then
      echo "    $tool: $(command -v "$tool")"
    else
      missing+=("$tool")
    fi
  done
  if (( ${#missing[@]} > 0 )); then
    echo "    missing: ${missing[*]}; installing the Debian package prometheus (it gives promtool and prometheus)"
    command -v apt-get >/dev/null 2>&1 ||
      die "${missing[*]} not installed and no apt-get here: install Prometheus (https://prometheus.io/download/) so that promtool and prometheus are on PATH"
    if (( EUID != 0 )); then
      command -v sudo >/dev/null 2>&1 || die "installing prometheus needs root or sudo: run as root, or install it yourself (apt-get install prometheus)"
      sudo=(sudo)
    fi
    step ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update ||
      die "apt-get update failed; install prometheus yourself (apt-get install prometheus)"
    step ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus ||
      die "apt-get install prometheus failed; install it yourself (https://prometheus.io/download/)"
    for tool in promtool prometheus; do
      command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after installing the package prometheus"
    done
  fi
}

# `chronicle status --exact --json` into ST_ENTRIES and ST_PENDING, ST_PROCESSING, ST_DONE,
# ST_FAILED (the outbox by state). Exact: on a large database status would otherwise estimate
# the entries, and the smoke run compares them before and after. Returns 1 when status fails or
# its answer lacks one of them.
read_status() {
  local json
  json="$("$BIN" status --exact --json)" || return 1
  ST_ENTRIES="$(sed -nE 's/.*"entries":([0-9]+).*/\1/p' <<<"$json")"
  ST_PENDING="$(outbox_count pending "$json")"
  ST_PROCESSING="$(outbox_count processing "$json")"
  ST_DONE="$(outbox_count done "$json")"
  ST_FAILED="$(outbox_count failed "$json")"
  [[ -n "$ST_ENTRIES" && -n "$ST_PENDING" && -n "$ST_PROCESSING" && -n "$ST_DONE" && -n "$ST_FAILED" ]]
}
outbox_count() { sed -nE "s/.*\"outbox\":\{[^}]*\"$1\":([0-9]+).*/\1/p" <<<"$2"; }

# ---------------------------------------------------------------- verbs

verb_build() { step cargo build --release "$@"; }

# The library, the binary, the integration tests and the doc tests. Not the benchmark (benches/: a
# program that runs for minutes, `cargo bench`) nor tests/external (`check-all`).
verb_test() { step cargo test "$@"; }

# The checks that need promtool and prometheus (tests/external.rs): installed when missing
# (Debian's package prometheus gives both), else the run fails saying what to install.
verb_check_all() {
  ensure_prometheus
  step cargo test --test external "$@"
  # Packaging, for real: chronicle.exe under Wine, and the container image.
  step bash packaging/check-run-ps1.sh
  step bash packaging/check-wine.sh
  step bash packaging/check-container.sh
}

verb_migrate() {
  build_release
  use_database_url
  step "$BIN" migrate "$@"
}

verb_worker() {
  build_release
  use_database_url
  worker_defaults 9110
  step "$BIN" worker "$@"
}

verb_db_start() {
  local devdb data log bindir="" version="" pwfile psql exists
  if use_runbook_container; then return 0; fi
  devdb="$(devdb_dir)"
  data="$devdb/data"
  log="$devdb/postgres.log"
  if [[ -f "$data/PG_VERSION" ]]; then version="$(cat "$data/PG_VERSION")"; fi
  bindir="$(find_pg_bindir "$version")" || bindir=""
  if [[ -n "$version" && -n "$bindir" ]] && quiet as_owner "$bindir/pg_ctl" status -D "$data"; then
    echo "dev database already running (data: $data)"
    echo "DATABASE_URL=$DEV_DATABASE_URL"
    return 0
  fi
  if tcp_open 127.0.0.1 "$DEV_DB_PORT"; then
    if dev_db_answers; then
      echo "a devtest database already answers on 127.0.0.1:$DEV_DB_PORT (not started by run.sh); using it"
      echo "DATABASE_URL=$DEV_DATABASE_URL"
      return 0
    fi
    die "port $DEV_DB_PORT on 127.0.0.1 is taken by a server that refuses wordloom/wordloom on $DEV_DB_NAME; stop it first"
  fi
  [[ -n "$bindir" ]] ||
    die "no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL server binaries, e.g. apt-get install postgresql"
  echo "    PostgreSQL server binaries: $bindir"
  psql="$bindir/psql"
  if (( EUID == 0 )); then
    id postgres >/dev/null 2>&1 ||
      die "running as root: initdb refuses root and there is no 'postgres' OS user; run as a normal user"
    if [[ -L "$devdb" ]]; then die "$devdb is a symbolic link; remove it"; fi
    if [[ ! -d "$devdb" ]]; then
      step mkdir -m 700 "$devdb"
      step chown postgres: "$devdb"
    fi
    [[ "$(stat -c %U "$devdb")" == postgres ]] || die "$devdb is not owned by the postgres user; remove it"
  else
    if [[ ! -d "$devdb" ]]; then step mkdir -m 700 "$devdb"; fi
  fi
  if [[ -z "$version" ]]; then
    # The superuser is wordloom with the runbook's password; every connection needs it (scram-sha-256).
    pwfile="$devdb/pwfile"
    trap "rm -f $(printf '%q' "$pwfile")" EXIT
    (umask 077 && printf '%s\n' "$DEV_DB_PASSWORD" >"$pwfile")
    if (( EUID == 0 )); then chown postgres: "$pwfile"; fi
    # UTF-8 ctype so that words in Chinese titles are letters, not separators.
    local locale=C
    if locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$'; then
      locale=C.UTF-8
    else
      echo "    warning: no C.UTF-8 locale here; the cluster uses locale C (Chinese search may be weaker)"
    fi
    owner_step "$bindir/initdb" -D "$data" -U "$DEV_DB_USER" --pwfile="$pwfile" \
      --auth=scram-sha-256 --encoding=UTF8 --locale="$locale"
    rm -f "$pwfile"
    echo "==> configure $data/postgresql.conf: port $DEV_DB_PORT, listen 127.0.0.1, socket in $devdb"
    {
      echo ""
      echo "# --- chronicle dev cluster (./run.sh db-start) ---"
      echo "port = $DEV_DB_PORT"
      echo "listen_addresses = '127.0.0.1'"
      echo "unix_socket_directories = '$devdb'"
    } >>"$data/postgresql.conf"
  fi
  if ! owner_step "$bindir/pg_ctl" -D "$data" -l "$log" -w -t 60 start; then
    tail -n 20 "$log" >&2 || true
    die "the dev database did not start (log: $log)"
  fi
  exists="$(PGPASSWORD="$DEV_DB_PASSWORD" "$psql" -X -w -h 127.0.0.1 -p "$DEV_DB_PORT" -U "$DEV_DB_USER" \
    -d postgres -Atqc "select 1 from pg_database where datname = '$DEV_DB_NAME'")"
  if [[ "$exists" != 1 ]]; then
    PGPASSWORD="$DEV_DB_PASSWORD" step "$bindir/createdb" -h 127.0.0.1 -p "$DEV_DB_PORT" -U "$DEV_DB_USER" "$DEV_DB_NAME"
  fi
  echo "dev database running (data: $data, log: $log)"
  echo "DATABASE_URL=$DEV_DATABASE_URL"
  echo "    export DATABASE_URL='$DEV_DATABASE_URL'"
}

verb_db_stop() {
  local devdb data bindir state
  state="$(container_state)"
  if [[ "$state" == running ]]; then step docker stop "$RUNBOOK_CONTAINER"; return 0; fi
  if [[ -n "$state" ]]; then echo "dev database is not running (docker container $RUNBOOK_CONTAINER: $state)"; return 0; fi
  devdb="$(devdb_dir)"
  data="$devdb/data"
  if [[ ! -f "$data/PG_VERSION" ]]; then
    echo "no dev database at $data; nothing to stop"
    return 0
  fi
  bindir="$(find_pg_bindir "$(cat "$data/PG_VERSION")")" ||
    die "no PostgreSQL server binaries (pg_ctl) found; install PostgreSQL server binaries, e.g. apt-get install postgresql"
  if ! quiet as_owner "$bindir/pg_ctl" status -D "$data"; then
    echo "dev database is not running"
    return 0
  fi
  owner_step "$bindir/pg_ctl" -D "$data" -m fast -w stop
}

# Stops the dev cluster and deletes its data folder (with --yes; without, says what it would
# delete and exits 2). The runbook's Docker container is not ours to remove: it says how.
verb_db_destroy() {
  local yes="" a devdb data state mb bindir
  for a in "$@"; do
    if [[ "$a" == --yes ]]; then yes=1; else usage >&2; echo "error: db-destroy takes --yes only, not '$a'" >&2; exit 2; fi
  done
  state="$(container_state)"
  if [[ -n "$state" ]]; then
    echo "    the runbook's Docker container $RUNBOOK_CONTAINER ($state) is not removed here; docker rm -f -v $RUNBOOK_CONTAINER removes it and its data"
  fi
  devdb="$(devdb_dir)"
  data="$devdb/data"
  if [[ ! -d "$devdb" ]]; then
    echo "no dev cluster at $devdb; nothing to delete"
    return 0
  fi
  mb="$(du -sm "$devdb" | cut -f1)"
  if [[ "$yes" != 1 ]]; then
    echo "error: db-destroy deletes the dev cluster at $devdb ($mb MB), every database in it, for good; confirm with ./run.sh db-destroy --yes" >&2
    exit 2
  fi
  if [[ -f "$data/PG_VERSION" ]] && bindir="$(find_pg_bindir "$(cat "$data/PG_VERSION")")" &&
     quiet as_owner "$bindir/pg_ctl" status -D "$data"; then
    owner_step "$bindir/pg_ctl" -D "$data" -m fast -w stop
  fi
  step rm -rf "$devdb"
  echo "dev cluster deleted ($devdb, $mb MB)"
}

# DATABASE_URL, else user postgres on 127.0.0.1:5432 (database CHRONICLE_DEMO_DB, default
# chronicle_demo), else the dev database.
demo_database() {
  local psql exists
  if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "    DATABASE_URL from the environment: $(mask "$DATABASE_URL"); the demo injects 5000 events into it"
    return 0
  fi
  [[ "$DEMO_DB_NAME" =~ ^[a-z_][a-z0-9_]*$ ]] ||
    die "CHRONICLE_DEMO_DB=$DEMO_DB_NAME: a database name is lowercase letters, digits and _ (not first a digit)"
  if pg_ready 127.0.0.1 5432; then
    if psql="$(find_psql)"; then
      # Probe without a password, as the chronicle binary will connect (it reads no PGPASSWORD or .pgpass).
      if quiet env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -c 'select 1'; then
        exists="$(env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres \
          -Atqc "select 1 from pg_database where datname = '$DEMO_DB_NAME'")"
        if [[ "$exists" != 1 ]]; then
          step env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -c "create database $DEMO_DB_NAME"
        else
          echo "    database $DEMO_DB_NAME already exists on 127.0.0.1:5432 (CHRONICLE_DEMO_DB or DATABASE_URL picks another)"
        fi
        export DATABASE_URL="$DEMO_DATABASE_URL"
        echo "    using $DATABASE_URL"
        return 0
      fi
      echo "    127.0.0.1:5432 does not accept user postgres without a password; using the dev database"
    else
      echo "    psql is not installed, so no database can be created on 127.0.0.1:5432; using the dev database"
    fi
  else
    echo "    no PostgreSQL on 127.0.0.1:5432; using the dev database"
  fi
  verb_db_start
  export DATABASE_URL="$DEV_DATABASE_URL"
}

verb_demo() {
  local psql="" url lib=""
  demo_database
  build_release
  step "$BIN" migrate
  step "$BIN" inject --count 5000
  if quiet "$BIN" help worker; then
    export OUTBOX_RUN_SECONDS="${OUTBOX_RUN_SECONDS:-5}"
    worker_defaults 0
    step "$BIN" worker
  else
    echo "the worker is not built yet; events are queued in the outbox"
  fi
  psql="$(find_psql)" || psql=""
  url="$(libpq_url "$DATABASE_URL")"
  if quiet "$BIN" help status; then
    step "$BIN" status
  elif [[ -n "$psql" ]]; then
    echo "    chronicle status is not available yet; asking psql"
    step "$psql" -X -v ON_ERROR_STOP=1 -d "$url" \
      -c 'select status, count(*) from chronicle_outbox_events group by 1 order by 1' \
      -c 'select count(*) from chronicle_entries'
  else
    echo "chronicle status is not available yet, and psql is not installed to look instead"
  fi
  if [[ -n "$psql" ]]; then
    lib="$("$psql" -X -w -d "$url" -Atqc 'select library_id from chronicle_events order by occurred_at, id limit 1')"
  fi
  if [[ ! "$lib" =~ ^[0-9a-fA-F-]{36}$ ]]; then
    echo "no library id to show (psql is missing or chronicle_events is empty); try: $BIN entries --library-id <id> --limit 10"
  elif quiet "$BIN" help entries; then
    step "$BIN" entries --library-id "$lib" --limit 10
  elif [[ -n "$psql" ]]; then
    echo "    chronicle entries is not available yet; asking psql"
    step "$psql" -X -v ON_ERROR_STOP=1 -d "$url" \
      -c "select occurred_at, summary from chronicle_entries where library_id = '$lib' order by occurred_at desc, id desc limit 10"
  else
    echo "chronicle entries is not available yet, and psql is not installed to look instead"
  fi
}

# Is DATABASE_URL the dev database (the same URL, whatever its scheme)?
is_dev_database() { [[ "${DATABASE_URL#*://}" == "${DEV_DATABASE_URL#*://}" ]]; }

# The runbook's smoke run (section 6.2, steps 1-4), with a verdict: exit 1 when the worker
# exits non-zero or logs an ERROR line, or afterwards rows are processing or failed, or
# chronicle_entries did not grow. An empty outbox first gets 100 injected events: in a
# database other than the dev one only with --yes (or CHRONICLE_SMOKE_WRITE=1), else exit 2.
verb_smoke() {
  local before injected="" rc errlog errors psql p problems=() container="" yes="${CHRONICLE_SMOKE_WRITE:-}"
  local q1='select status, count(*) from chronicle_outbox_events group by 1 order by 1;'
  local q2='select count(*) from chronicle_entries;'
  for p in "$@"; do
    if [[ "$p" == --yes ]]; then yes=1; else usage >&2; echo "error: smoke takes --yes only, not '$p'" >&2; exit 2; fi
  done
  if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "    DATABASE_URL from the environment: $(mask "$DATABASE_URL")"
  else
    echo "    DATABASE_URL is not set; using the runbook's dev database: $DEV_DATABASE_URL"
    verb_db_start
    if [[ "$(container_state)" == running ]]; then container="$RUNBOOK_CONTAINER"; fi
    export DATABASE_URL="$DEV_DATABASE_URL"
  fi
  build_release
  step "$BIN" migrate
  read_status || die "chronicle status --exact --json failed or answered something unexpected"
  before="$ST_ENTRIES"
  echo "    before: $ST_ENTRIES entries; outbox: pending $ST_PENDING, processing $ST_PROCESSING, done $ST_DONE, failed $ST_FAILED"
  if (( ST_PENDING == 0 )) && ! is_dev_database && [[ "$yes" != 1 ]]; then
    echo "error: nothing is pending in the outbox, and the smoke run would inject 100 synthetic events (1 library) into" \
      "DATABASE_URL, which is not the dev database; allow it with ./run.sh smoke --yes (or CHRONICLE_SMOKE_WRITE=1)," \
      "or queue events there first" >&2
    exit 2
  fi
  if (( ST_PENDING == 0 )); then
    echo "    nothing is pending in the outbox: injecting 100 synthetic events (1 library) for the worker to project"
    step "$BIN" inject --count 100 --libraries 1
    injected=1
  fi
  export OUTBOX_RUN_SECONDS="${OUTBOX_RUN_SECONDS:-2}"
  worker_defaults 9110
  # The worker's log (stderr) is shown as it comes and kept, to look for ERROR lines.
  errlog="$(mktemp "${TMPDIR:-/tmp}/chronicle-smoke.XXXXXX")"
  trap "rm -f $(printf '%q' "$errlog")" EXIT
  show "$BIN" worker
  exec 3>&1
  set +e
  "$BIN" worker 2>&1 >&3 3>&- | tee "$errlog" >&2
  rc="${PIPESTATUS[0]}"
  set -e
  exec 3>&-
  if (( rc != 0 )); then
    problems+=("the worker exited with $rc (1: failure, 2: configuration, 3: database unreachable or refusing us)")
  fi
  errors="$(grep -E '^\[[^]]* ERROR |"level": ?"ERROR"' "$errlog" || true)"
  if [[ -n "$errors" ]]; then problems+=("the worker logged ERROR lines:"$'\n'"$errors"); fi
  echo "==> the runbook's acceptance queries"
  if psql="$(find_psql)"; then
    if ! step "$psql" -X -w -v ON_ERROR_STOP=1 -d "$(libpq_url "$DATABASE_URL")" -c "$q1" -c "$q2"; then
      problems+=("psql could not run the acceptance queries")
    fi
  elif [[ -n "$container" ]]; then
    if ! step docker exec "$container" psql -U "$DEV_DB_USER" -d "$DEV_DB_NAME" -c "$q1" ||
       ! step docker exec "$container" psql -U "$DEV_DB_USER" -d "$DEV_DB_NAME" -c "$q2"; then
      problems+=("docker exec $container psql could not run the acceptance queries")
    fi
  else
    echo "    psql is not installed: chronicle status shows the same counts"
    step "$BIN" status || problems+=("chronicle status failed")
  fi
  if read_status; then
    echo "    after: $ST_ENTRIES entries; outbox: pending $ST_PENDING, processing $ST_PROCESSING, done $ST_DONE, failed $ST_FAILED"
    if (( ST_PROCESSING > 0 )); then
      problems+=("$ST_PROCESSING outbox row(s) still processing after the worker stopped (another worker on this database?)")
    fi
    if (( ST_FAILED > 0 )); then
      problems+=("$ST_FAILED event(s) failing (their delivery failed): see chronicle status and chronicle show EVENT_ID; after the fix, chronicle replay-failed")
    fi
    if (( ST_ENTRIES <= before )); then
      problems+=("chronicle_entries did not grow ($before before, $ST_ENTRIES after): the worker projected nothing new in $OUTBOX_RUN_SECONDS s")
    fi
  else
    problems+=("chronicle status --exact --json failed after the worker ran")
  fi
  if (( ${#problems[@]} > 0 )); then
    echo "smoke run FAILED:" >&2
    for p in "${problems[@]}"; do echo "  - $p" >&2; done
    exit 1
  fi
  echo "smoke run OK: the worker exited 0 without an ERROR line; entries $before -> $ST_ENTRIES${injected:+ (100 events injected)}; none processing or failed"
}

# A local Prometheus in the foreground (Ctrl+C stops it): monitoring/alerts.yml loaded, job
# chronicle scraping the local worker; its config and data in a folder per port under /tmp.
verb_monitoring() {
  local port="${PROMETHEUS_PORT:-}" target dir
  ensure_prometheus
  target="127.0.0.1:${OUTBOX_METRICS_PORT:-9110}"
  if [[ -n "$port" ]]; then
    [[ "$port" =~ ^[0-9]+$ ]] || die "PROMETHEUS_PORT=$port is not a port number"
    if tcp_open 127.0.0.1 "$port"; then die "PROMETHEUS_PORT=$port: 127.0.0.1:$port is taken"; fi
  else
    for (( port = 9090; port < 9110; port++ )); do
      if ! tcp_open 127.0.0.1 "$port"; then break; fi
      echo "    127.0.0.1:$port is taken; trying the next port"
    done
    (( port < 9110 )) || die "no free port in 9090-9109; set PROMETHEUS_PORT"
  fi
  dir="${TMPDIR:-/tmp}/chronicle-prometheus-$port"
  mkdir -p "$dir/data"
  echo "==> write $dir/prometheus.yml: job chronicle scraping $target every 5 s, rules monitoring/alerts.yml"
  {
    echo "# Written by ./run.sh monitoring."
    echo "global:"
    echo "  scrape_interval: 5s"
    echo "  evaluation_interval: 5s"
    echo "rule_files:"
    echo "  - '$ROOT/monitoring/alerts.yml'"
    echo "scrape_configs:"
    echo "  - job_name: chronicle"
    echo "    static_configs:"
    echo "      - targets: ['$target']"
  } >"$dir/prometheus.yml"
  step promtool check config "$dir/prometheus.yml"
  echo "Prometheus: http://127.0.0.1:$port  (targets: /targets, alerts: /alerts); Ctrl+C stops it"
  echo "    it scrapes the worker's metrics on $target (./run.sh worker); Grafana: import monitoring/grafana-dashboard.json"
  show prometheus "--config.file=$dir/prometheus.yml" "--storage.tsdb.path=$dir/data" "--web.listen-address=127.0.0.1:$port"
  exec prometheus "--config.file=$dir/prometheus.yml" "--storage.tsdb.path=$dir/data" "--web.listen-address=127.0.0.1:$port"
}

# ---------------------------------------------------------------- dispatch
# One verb per arm, in the same order as the switch in run.ps1 (a test compares them).

verb="${1:-help}"
if (( $# > 0 )); then shift; fi
if [[ "$verb" == -h || "$verb" == --help ]]; then verb=help; fi
case "$verb" in
  help) usage ;;
  build) verb_build "$@" ;;
  test) verb_test "$@" ;;
  check-all) verb_check_all "$@" ;;
  migrate) verb_migrate "$@" ;;
  worker) verb_worker "$@" ;;
  db-start) verb_db_start ;;
  db-stop) verb_db_stop ;;
  db-destroy) verb_db_destroy "$@" ;;
  demo) verb_demo ;;
  smoke) verb_smoke "$@" ;;
  monitoring) verb_monitoring ;;
  *) usage >&2; echo "error: unknown verb '$verb'" >&2; exit 2 ;;
esac
