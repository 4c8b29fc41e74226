#!/usr/bin/env bash
# Installs everything Imago needs, pinned, and skips what is already in place:
#   .venv                  the project (pip, constraints.txt)
#   contracts/node_modules the Tolk compiler and the TVM emulator (npm ci, package-lock.json)
#   the inference engine   vLLM (CPU build here) and the converted model (scripts/setup_engine.sh)
# IMAGO_SKIP_ENGINE=1 skips the engine (for work that needs no model).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '[bootstrap] %s\n' "$*" >&2; }

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    log "Imago needs Python 3.11 (set PYTHON=/path/to/python3.11)"
    exit 1
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing Node.js and npm from Debian"
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
fi
if ! node -e 'process.exit(+process.versions.node.split(".")[0] >= 18 ? 0 : 1)'; then
    log "Imago's devnet needs Node.js 18 or newer (found $(node --version))"
    exit 1
fi

stamp=.venv/.imago-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing the Python project into .venv"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$want" >"$stamp"
fi

npm_stamp=contracts/node_modules/.imago-installed
npm_want=$(sha256sum contracts/package-lock.json | cut -c1-16)
if [ ! -f "$npm_stamp" ] || [ "$(cat "$npm_stamp")" != "$npm_want" ]; then
    log "installing npm packages in contracts/"
    (cd contracts && npm ci --no-audit --no-fund --loglevel=error)
    echo "$npm_want" >"$npm_stamp"
fi

if [ "${IMAGO_SKIP_ENGINE:-0}" != 1 ]; then
    "$root/scripts/setup_engine.sh"
fi
log "ready"
