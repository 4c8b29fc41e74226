#!/usr/bin/env bash
# The first command: installs everything, brings the whole system up on loopback
# (devnet, contracts, matcher, a node with a real model, the gateway) and asks it a
# question through the official openai package.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/imago up "$@"
.venv/bin/imago chat "What is the capital of France? Answer in one sentence."
