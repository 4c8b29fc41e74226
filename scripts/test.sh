#!/usr/bin/env bash
# The test command: installs what the tests need (pinned), then runs lint and pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/node -k receipt`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# The metering tests also run against PostgreSQL; this kind of machine runs one, but
# start it if it has stopped.
if ! pg_isready -q -h 127.0.0.1 2>/dev/null && command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache  # the import rule in pyproject.toml
exec .venv/bin/pytest "$@"
