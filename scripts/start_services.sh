#!/usr/bin/env bash
# Start PostgreSQL and Redis for the tests if they are not running (Debian packages, as on the CI machine).
# On a bare machine it installs them first (apt-get, as root) and makes PostgreSQL answer the tests as
# they connect (postgres@127.0.0.1, database "test"); not as root, it prints the one command to run.
set -euo pipefail
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

missing=()
pg_up || command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
redis_up || command -v redis-server >/dev/null || missing+=(redis-server)
fresh_pg=false
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "not installed: ${missing[*]}. Run this once, then make test again:" >&2
    echo "  sudo bash scripts/start_services.sh   # apt-get install -y ${missing[*]}, then starts them" >&2
    exit 1
  fi
  echo "installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then fresh_pg=true; fi
fi

if $fresh_pg; then
  # A cluster this script just installed: let the tests in as postgres from 127.0.0.1 without a password.
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  sed -i '1i host all postgres 127.0.0.1/32 trust' "/etc/postgresql/$ver/main/pg_hba.conf"
  if pg_up; then pg_ctlcluster --skip-systemctl-redirect "$ver" main reload; fi
fi
if ! pg_up; then
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  echo "starting PostgreSQL $ver" >&2
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start
fi
if ! redis_up; then
  echo "starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
for i in $(seq 1 30); do pg_up && redis_up && break; sleep 1; done
pg_up && redis_up || { echo "PostgreSQL or Redis did not come up" >&2; exit 1; }

# The tests connect to the database "test" (NEWSLORA_TEST_PG); create it where it is missing.
if command -v psql >/dev/null && ! psql -h 127.0.0.1 -U postgres -d test -w -tAc 'SELECT 1' >/dev/null 2>&1; then
  if psql -h 127.0.0.1 -U postgres -d postgres -w -tAc 'SELECT 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -d postgres -w -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" \
      | grep -q 1 || createdb -h 127.0.0.1 -U postgres test
  else
    echo "PostgreSQL is up but postgres@127.0.0.1 cannot log in without a password: add" >&2
    echo "  host all postgres 127.0.0.1/32 trust   to the top of pg_hba.conf (then reload), or set" >&2
    echo "  NEWSLORA_TEST_PG=postgresql://USER:PASSWORD@127.0.0.1:5432/DB for the tests" >&2
    exit 1
  fi
fi
