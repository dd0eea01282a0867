#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (pg_ctl, initdb, postgres) are available and print
# the directory that holds them.
#
# Idempotent: when the binaries are already there this is a fast no-op. Otherwise it installs
# Debian's `postgresql` package with apt-get (via sudo when not root). The tests start their own
# throwaway server (tests/pg.py), so any cluster the package starts on install is stopped again.
#
# Search order: $PG_BINDIR, pg_ctl on PATH, /usr/lib/postgresql/<newest>/bin.
set -euo pipefail

has_server_bins() {
    [[ -x "$1/pg_ctl" && -x "$1/initdb" && -x "$1/postgres" ]]
}

find_bindir() {
    local dir found
    if [[ -n "${PG_BINDIR:-}" ]] && has_server_bins "$PG_BINDIR"; then
        printf '%s\n' "$PG_BINDIR"
        return 0
    fi
    if found=$(command -v pg_ctl 2>/dev/null); then
        dir=$(dirname "$(readlink -f "$found")")
        if has_server_bins "$dir"; then
            printf '%s\n' "$dir"
            return 0
        fi
    fi
    # Newest major version first.
    while IFS= read -r dir; do
        if [[ -n "$dir" ]] && has_server_bins "$dir"; then
            printf '%s\n' "$dir"
            return 0
        fi
    done < <(compgen -G '/usr/lib/postgresql/*/bin' | sort -V -r)
    return 1
}

if bindir=$(find_bindir); then
    echo "$bindir"
    exit 0
fi

echo "ensure-postgres: PostgreSQL server binaries not found; installing Debian package 'postgresql'" >&2

# shellcheck source=apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
apt_install ensure-postgres postgresql

# The package may have created and started a "main" cluster; the tests do not use it.
if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version cluster _port status _rest; do
        if [[ "$status" == online* ]]; then
            "${as_root[@]}" pg_ctlcluster "$version" "$cluster" stop >&2 || true
        fi
    done
fi

if bindir=$(find_bindir); then
    echo "$bindir"
    exit 0
fi
echo "ensure-postgres: postgresql was installed but pg_ctl/initdb/postgres are still missing" >&2
exit 1
