#!/usr/bin/env bash
# Start Debian's PostgreSQL on loopback and create the test role and database.
# Prints the TEST_DATABASE_URL to use. Idempotent: safe to run when it is already up.
set -euo pipefail
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start >/dev/null 2>&1 || true
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 1
done
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "postgresql did not start" >&2; exit 1; }
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='memfit'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"CREATE ROLE memfit LOGIN PASSWORD 'memfit' CREATEDB\""
su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='memfit_test'\"" | grep -q 1 ||
  su postgres -c "createdb -O memfit memfit_test"
echo "postgresql://memfit:memfit@127.0.0.1:5432/memfit_test"
