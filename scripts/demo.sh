#!/usr/bin/env bash
# Install the gateway into .venv and start it in front of the bundled mock LLM service
# (in-memory state, no Redis needed). Prints a token and curl commands to try.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/gateway demo "$@"
