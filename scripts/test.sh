#!/usr/bin/env bash
# The whole test suite, install step included: the command .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
lint-imports
mypy actors transport control engines observability scripts
python -m pytest -q -ra --durations=15 "$@"
