#!/usr/bin/env bash
# PostgreSQL for the scale-out tests: installed from the Debian packages if missing, started on
# 127.0.0.1:5432, with a password role `emlab` (CREATEDB) the tests use. Idempotent; needs root
# (or sudo) only to install and start. Prints the URL the tests read from EM_LAB_TEST_POSTGRES.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
VERSION=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$VERSION main"; then
  $SUDO pg_createcluster "$VERSION" main >/dev/null
fi
if ! pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $4}' | grep -q online; then
  $SUDO pg_ctlcluster "$VERSION" main start
fi
PORT=$(pg_lsclusters -h | awk -v v="$VERSION" '$1==v && $2=="main" {print $3}')
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
for _ in $(seq 1 30); do as_postgres psql -p "$PORT" -qtAc "select 1" >/dev/null 2>&1 && break; sleep 1; done
if [ "$(as_postgres psql -p "$PORT" -qtAc "select 1 from pg_roles where rolname='emlab'")" != 1 ]; then
  as_postgres psql -p "$PORT" -qc "create role emlab login createdb password 'emlab'"
fi
echo "postgresql://emlab:emlab@127.0.0.1:${PORT}/postgres"
