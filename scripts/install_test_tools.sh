#!/usr/bin/env bash
# The programs the tests drive besides Python packages, from Debian's packages: chromium (the dashboard's
# browser tests, through Playwright: never `playwright install`, which downloads a browser) and
# docker-compose (tests/test_deploy.py validates docker-compose.yml; there is no Docker engine to run it).
# As root it installs what is missing; otherwise it prints the one command to run.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v docker-compose >/dev/null || missing+=(docker-compose)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "not installed: ${missing[*]}. Run this once, then make test again:" >&2
  echo "  sudo bash scripts/install_test_tools.sh   # apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} (apt-get)" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
