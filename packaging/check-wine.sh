#!/usr/bin/env bash
# Runs the Windows build, chronicle.exe, for real under Wine against a real PostgreSQL:
# --help, migrate, inject, and a worker smoke run with OUTBOX_RUN_SECONDS that must drain
# what it should. Installs what it needs (Debian: wine64, gcc-mingw-w64-x86-64; rustup:
# the x86_64-pc-windows-gnu target) and fails loudly when it cannot.
#
# Current Rust std needs ProcessPrng from bcryptprimitives.dll, which Wine 8 lacks: a
# tiny shim DLL (packaging/wine/bcryptprimitives.c) is built here with mingw and put
# beside the exe for this run only. It is never shipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source packaging/common.sh

TARGET=x86_64-pc-windows-gnu
header "Windows build under Wine"
ensure_rust_target "$TARGET"
ensure_cmd x86_64-w64-mingw32-gcc gcc-mingw-w64-x86-64
[[ -x /usr/lib/wine/wine64 ]] || command -v wine64 >/dev/null 2>&1 || apt_install wine64
WINE="$(command -v wine64 || echo /usr/lib/wine/wine64)"
ensure_cmd psql postgresql-client

export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER="${CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER:-x86_64-w64-mingw32-gcc}"
step cargo build --release --target "$TARGET"
work="$(mktemp -d)"
WINESERVER="$(command -v wineserver || echo /usr/lib/wine/wineserver)"
trap 'WINEPREFIX="$work/prefix" "$WINESERVER" -k >/dev/null 2>&1 || true; rm -rf "$work"; drop_database' EXIT
cp "${CARGO_TARGET_DIR:-target}/$TARGET/release/chronicle.exe" "$work/"
step x86_64-w64-mingw32-gcc -shared -O2 -o "$work/bcryptprimitives.dll" packaging/wine/bcryptprimitives.c

export WINEPREFIX="$work/prefix" WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
exe() { step "$WINE" "$work/chronicle.exe" "$@"; }

exe --version
exe --help >/dev/null
echo "    (--help printed $("$WINE" "$work/chronicle.exe" --help | wc -l) lines)"

create_database chronicle_wine_check
export DATABASE_URL="$CHECK_DATABASE_URL"
exe migrate
exe inject --count 2000 --libraries 2
OUTBOX_RUN_SECONDS=4 OUTBOX_METRICS_PORT=0 OUTBOX_WORKER_ID=wine exe worker
expect_sql "select count(*) from chronicle_entries" 2000
expect_sql "select count(*) from chronicle_outbox_events where status <> 'done'" 0
expect_sql "select count(distinct claimed_by) from chronicle_outbox_events" 1
echo "chronicle.exe under Wine: --help, migrate, inject and a worker smoke run drained 2000 events"
