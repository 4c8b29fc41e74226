#!/usr/bin/env bash
# The first command: installs everything, brings the whole system up on loopback
# (devnet, contracts, matcher, a node with a real model, the gateway) and asks it a
# question through the official openai package.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/imago up "$@"
.venv/bin/imago chat "What is the capital of France? Answer in one sentence."

# The money moves by itself: the matcher commits the epoch (30 s on the devnet) and
# charges the escrow, the node claims its payout. Show the node's earnings once paid.
echo "Waiting for the first epoch to settle on-chain (about 30 s) ..."
settled() {
    .venv/bin/imago provider earnings --name provider --json 2>/dev/null |
        .venv/bin/python -c 'import json, sys; sys.exit(float(json.load(sys.stdin)["totals"]["claimed"]) <= 0)'
}
for _ in $(seq 1 60); do settled && break; sleep 2; done
.venv/bin/imago provider earnings --name provider
