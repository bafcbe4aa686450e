#!/usr/bin/env bash
# Start PostgreSQL and Redis for the tests if they are not running (Debian packages, as on the CI machine).
set -euo pipefail
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

if ! pg_up; then
  if command -v pg_ctlcluster >/dev/null; then
    ver=$(ls /etc/postgresql | sort -V | tail -1)
    echo "starting PostgreSQL $ver" >&2
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start
  else
    echo "PostgreSQL is not running and pg_ctlcluster is missing: apt-get install postgresql" >&2; exit 1
  fi
fi
if ! redis_up; then
  if command -v redis-server >/dev/null; then
    echo "starting Redis" >&2
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  else
    echo "Redis is not running and redis-server is missing: apt-get install redis-server" >&2; exit 1
  fi
fi
for i in $(seq 1 30); do pg_up && redis_up && exit 0; sleep 1; done
echo "PostgreSQL or Redis did not come up" >&2; exit 1
