# Shared by the packaging checks (sourced, not run).

header() { printf '\n======== %s ========\n' "$*"; }
step() { echo "==> $*"; "$@"; }

APT_UPDATED=0
apt_install() {
  if (( EUID != 0 )); then
    echo "error: $* is missing and installing it needs root (apt-get install $*)" >&2
    exit 1
  fi
  echo "installing $* (Debian packages)"
  if (( APT_UPDATED == 0 )); then
    step env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  step env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# ensure_cmd COMMAND PACKAGE: installs PACKAGE when COMMAND is missing.
ensure_cmd() { command -v "$1" >/dev/null 2>&1 || apt_install "$2"; command -v "$1" >/dev/null 2>&1 || { echo "error: $1 still missing after installing $2" >&2; exit 1; }; }

ensure_rust_target() {
  if rustup target list --installed 2>/dev/null | grep -qx "$1"; then return 0; fi
  echo "installing the rust target $1 (rustup)"
  step rustup target add "$1"
}

# The server the checks use: CHRONICLE_TEST_DATABASE_URL / DATABASE_URL (a libpq URL of
# a user that may create databases), else the local default.
ADMIN_URL="${CHRONICLE_TEST_DATABASE_URL:-${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/postgres}}"
ADMIN_URL="$(sed -E 's#^postgresql\+[A-Za-z0-9_]+://#postgresql://#' <<<"$ADMIN_URL")"
CHECK_DB=""
CHECK_DATABASE_URL=""

create_database() {
  CHECK_DB="$1_$$"
  psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" -c "create database $CHECK_DB" \
    || { echo "error: cannot create a database on $(sed -E 's#(://[^:/@]*:)[^@/]*@#\1***@#' <<<"$ADMIN_URL")" >&2; exit 1; }
  CHECK_DATABASE_URL="$(sed -E "s#/[^/?]*(\\?|\$)#/$CHECK_DB\\1#" <<<"$ADMIN_URL")"
}

drop_database() {
  if [[ -n "$CHECK_DB" ]]; then
    psql -X -q -d "$ADMIN_URL" -c "drop database if exists $CHECK_DB with (force)" >/dev/null 2>&1 || true
  fi
}

# expect_sql QUERY VALUE: the query on the check database must print VALUE.
expect_sql() {
  local got
  got="$(psql -X -A -t -q -d "$CHECK_DATABASE_URL" -c "$1")"
  if [[ "$got" != "$2" ]]; then
    echo "error: $1 gave $got, expected $2" >&2
    exit 1
  fi
  echo "    ok: $1 = $got"
}
