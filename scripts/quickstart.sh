#!/usr/bin/env bash
# The main job: set up, then train the NECO MLP with Associated Learning and its
# BP baseline (the same inference path, trained end to end) on scikit-learn's digits, and compare. Extra arguments go
# to `al-ext train` (try --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m al_ext train --dataset digits --model mlp --epochs 20 --batch-size 32 --compare-bp "$@"
