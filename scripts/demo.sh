#!/usr/bin/env bash
# Install, then run the main job: a local cluster (embedded NATS, control plane, 2 vLLM-CPU engines on a
# generated tiny model), a demo workload over NATS, and a summary table. Extra args go to `drover up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/drover up "$@"
