#!/usr/bin/env bash
# Install everything (Python packages into .venv, redis-server from Debian when missing) and
# run the whole test suite: lint, types, unit, integration and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
command -v redis-server >/dev/null || apt_install redis-server
command -v promtool >/dev/null || apt_install prometheus

echo "== ruff"; .venv/bin/ruff check gateway tests bench loadtests deploy; .venv/bin/ruff format --check gateway tests bench loadtests deploy
echo "== mypy"; .venv/bin/mypy gateway
echo "== pytest"
exec .venv/bin/pytest -p no:cacheprovider "$@"
