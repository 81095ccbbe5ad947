#!/usr/bin/env bash
# The newcomer's one command: set up a virtualenv, install mmsvc, run `mmsvc demo`.
#   ./scripts/demo.sh [demo options, e.g. --procs 8 --batch-size 31]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing redis-server (the embedded page store)..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
  else
    echo "mmsvc needs redis-server on PATH (macOS: brew install redis)" >&2
    exit 1
  fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv..."
  "$PY" -m venv .venv
fi
echo "installing mmsvc into .venv..."
if ! .venv/bin/python -m pip install -q -e . >.venv/install.log 2>&1; then
  cat .venv/install.log >&2
  exit 1
fi
exec .venv/bin/mmsvc demo "$@"
