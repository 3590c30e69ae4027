#!/usr/bin/env bash
# Start a PostgreSQL cluster on loopback for the decision-record tests and print its URL (Debian's `postgresql`
# package, installed by scripts/ci-system-deps.sh). Idempotent: an existing cluster is reused and (re)started.
#   export AEGIS_TEST_POSTGRES_URL="$(bash scripts/ci-postgres.sh)"      # what .ci/run does
# The role may create databases: each test works in a database of its own. Needs root (CI runs as root).
set -euo pipefail
name=aegis-ci
port="${AEGIS_TEST_POSTGRES_PORT:-54329}"
password=aegis-test   # loopback-only throwaway cluster

version="$(pg_lsclusters -h 2>/dev/null | awk -v n="$name" '$2 == n {print $1}')"
if [ -z "$version" ]; then
  version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
  pg_createcluster --port "$port" "$version" "$name" -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
fi
port="$(pg_lsclusters -h | awk -v n="$name" '$2 == n {print $3}')"
pg_ctlcluster "$version" "$name" status >/dev/null 2>&1 || pg_ctlcluster "$version" "$name" start >&2

psql_admin() { runuser -u postgres -- psql --port "$port" --no-psqlrc --quiet --tuples-only --no-align "$@"; }
for _ in $(seq 1 50); do
  psql_admin -c "select 1" >/dev/null 2>&1 && break
  sleep 0.2
done
if [ "$(psql_admin -c "select 1 from pg_roles where rolname = 'aegis'")" != "1" ]; then
  psql_admin -c "create role aegis login createdb password '$password'" >/dev/null
fi
if [ "$(psql_admin -c "select 1 from pg_database where datname = 'aegis'")" != "1" ]; then
  psql_admin -c "create database aegis owner aegis" >/dev/null
fi
echo "postgresql+psycopg://aegis:${password}@127.0.0.1:${port}/aegis"
