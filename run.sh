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
DEMO_DATABASE_URL="postgres://postgres@127.0.0.1:5432/chronicle_demo"
BIN="${CARGO_TARGET_DIR:-target}/release/chronicle"

usage() {
  cat <<'EOF'
usage: ./run.sh <verb> [args...]

verbs:
  help       show this list
  build      cargo build --release
  test       cargo test [args...]: unit, integration and doc tests (the tests find or start a PostgreSQL themselves)
  check-all  the external checks: promtool + Prometheus tests (installed if missing), chronicle.exe under Wine, the container image
             (alert rules, dashboard, a live scrape by a real Prometheus; see monitoring/README.md)
  migrate    build, then chronicle migrate [args...] on DATABASE_URL (unset: the dev database)
  worker     build, then chronicle worker [args...] with the runbook's OUTBOX_* values as defaults
  db-start   start the dev PostgreSQL: 127.0.0.1:5435, user/password wordloom, database wordloom_test
  db-stop    stop the dev PostgreSQL
  demo       migrate, inject 5000 events, run the worker for 5 s, show the results
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

build_release() { step cargo build --release; }

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

# ---------------------------------------------------------------- verbs

verb_build() { step cargo build --release "$@"; }

# The library, the binary, the integration tests and the doc tests. Not the benchmark (benches/: a
# program that runs for minutes, `cargo bench`) nor tests/external (`check-all`).
verb_test() { step cargo test "$@"; }

# The checks that need promtool and prometheus (tests/external.rs): installed when missing
# (Debian's package prometheus gives both), else the run fails saying what to install.
verb_check_all() {
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
  local devdb data log bindir version="" pwfile psql exists
  devdb="$(devdb_dir)"
  data="$devdb/data"
  log="$devdb/postgres.log"
  if [[ -f "$data/PG_VERSION" ]]; then version="$(cat "$data/PG_VERSION")"; fi
  bindir="$(find_pg_bindir "$version")" ||
    die "no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL server binaries, e.g. apt-get install postgresql"
  echo "    PostgreSQL server binaries: $bindir"
  psql="$bindir/psql"
  if [[ -n "$version" ]] && quiet as_owner "$bindir/pg_ctl" status -D "$data"; then
    echo "dev database already running (data: $data)"
    echo "DATABASE_URL=$DEV_DATABASE_URL"
    return 0
  fi
  if tcp_open 127.0.0.1 "$DEV_DB_PORT"; then
    if PGPASSWORD="$DEV_DB_PASSWORD" quiet "$psql" -X -w -h 127.0.0.1 -p "$DEV_DB_PORT" \
         -U "$DEV_DB_USER" -d "$DEV_DB_NAME" -c 'select 1'; then
      echo "a devtest database already answers on 127.0.0.1:$DEV_DB_PORT (not started by run.sh); using it"
      echo "DATABASE_URL=$DEV_DATABASE_URL"
      return 0
    fi
    die "port $DEV_DB_PORT on 127.0.0.1 is taken by another program; stop it first"
  fi
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
  local devdb data bindir
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

# DATABASE_URL, else user postgres on 127.0.0.1:5432 (database chronicle_demo), else the dev database.
demo_database() {
  local psql exists
  if [[ -n "${DATABASE_URL:-}" ]]; then
    echo "    DATABASE_URL from the environment: $(mask "$DATABASE_URL")"
    return 0
  fi
  if pg_ready 127.0.0.1 5432; then
    if psql="$(find_psql)"; then
      # Probe without a password, as the chronicle binary will connect (it reads no PGPASSWORD or .pgpass).
      if quiet env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -c 'select 1'; then
        exists="$(env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres \
          -Atqc "select 1 from pg_database where datname = 'chronicle_demo'")"
        if [[ "$exists" != 1 ]]; then
          step env -u PGPASSWORD PGPASSFILE=/nonexistent "$psql" -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -c 'create database chronicle_demo'
        else
          echo "    database chronicle_demo already exists on 127.0.0.1:5432"
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

# ---------------------------------------------------------------- dispatch
# One verb per arm, in the same order as the switch in run.ps1 (a test compares them).

verb="${1:-help}"
if (( $# > 0 )); then shift; fi
case "$verb" in
  help) usage ;;
  build) verb_build "$@" ;;
  test) verb_test "$@" ;;
  check-all) verb_check_all "$@" ;;
  migrate) verb_migrate "$@" ;;
  worker) verb_worker "$@" ;;
  db-start) verb_db_start ;;
  db-stop) verb_db_stop ;;
  demo) verb_demo ;;
  *) usage >&2; echo "error: unknown verb '$verb'" >&2; exit 2 ;;
esac
