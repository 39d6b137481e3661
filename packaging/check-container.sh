#!/usr/bin/env bash
# Builds the container image (Containerfile: a static musl binary in a FROM scratch
# image, non-root, with a HEALTHCHECK that runs `chronicle healthcheck`), then runs
# `chronicle --version` and a smoke worker run in it against the host's PostgreSQL,
# and reports the image size (target: 15 MB or less). Installs what it needs (Debian:
# podman, runc, musl-tools; rustup: the x86_64-unknown-linux-musl target) and fails
# loudly when it cannot.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source packaging/common.sh

TARGET=x86_64-unknown-linux-musl
IMAGE="localhost/chronicle-check:$$"
header "container image"
ensure_rust_target "$TARGET"
ensure_cmd musl-gcc musl-tools
ensure_cmd podman podman
ensure_cmd runc runc
ensure_cmd psql postgresql-client

step cargo build --profile dist --target "$TARGET"
bin="${CARGO_TARGET_DIR:-target}/$TARGET/dist/chronicle"
if ! file "$bin" 2>/dev/null | grep -q "statically linked\|static-pie linked"; then
  echo "error: $bin is not a static binary: $(file "$bin" 2>/dev/null)" >&2
  exit 1
fi
ctx="$(mktemp -d)"
cleanup() {
  podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
  rm -rf "$ctx"
  drop_database
}
trap cleanup EXIT
cp Containerfile "$bin" "$ctx/"
# --format docker keeps the HEALTHCHECK (the OCI format has no such field).
step podman build --format docker -t "$IMAGE" "$ctx"

RUN=(podman run --rm --runtime runc --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
version="$("${RUN[@]}" "$IMAGE" --version)"
echo "    in the image: $version"
[[ "$version" == chronicle* ]] || { echo "error: --version printed $version" >&2; exit 1; }
user="$(podman image inspect --format '{{.Config.User}}' "$IMAGE")"
[[ "$user" != "" && "$user" != 0* && "$user" != root* ]] || { echo "error: the image runs as root ($user)" >&2; exit 1; }
health="$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"
[[ "$health" == *healthcheck* ]] || { echo "error: the image has no HEALTHCHECK running chronicle healthcheck: $health" >&2; exit 1; }
echo "    user $user, healthcheck $health"

create_database chronicle_container_check
"$bin" migrate --database-url "$CHECK_DATABASE_URL" >/dev/null
"$bin" inject --count 3000 --database-url "$CHECK_DATABASE_URL" >/dev/null
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
# The worker in the container, with its health check probed from inside while it runs.
step "${RUN[@]}" -d --name "chronicle-check-$$" -e DATABASE_URL="$CHECK_DATABASE_URL" \
  -e OUTBOX_RUN_SECONDS=6 -e OUTBOX_METRICS_PORT="$port" -e OUTBOX_WORKER_ID=container "$IMAGE" worker
ok=0
for _ in $(seq 1 20); do
  if podman exec "chronicle-check-$$" /chronicle healthcheck >/dev/null 2>&1; then ok=1; break; fi
  sleep 0.25
done
podman wait "chronicle-check-$$" >/dev/null 2>&1 || true
(( ok == 1 )) || { echo "error: chronicle healthcheck never passed inside the container" >&2; exit 1; }
echo "    ok: chronicle healthcheck passed inside the running container"
expect_sql "select count(*) from chronicle_entries" 3000
expect_sql "select count(*) from chronicle_outbox_events where status <> 'done'" 0
expect_sql "select string_agg(distinct claimed_by, ',') from chronicle_outbox_events" container

size="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
mb="$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1000000 }')"
echo "image size: $mb MB ($size bytes; target 15 MB or less)"
if (( size > 15000000 )); then
  echo "error: the image is larger than 15 MB" >&2
  exit 1
fi
