#!/usr/bin/env bash
# Set up, then run the test suite (CUDA tests skip, saying why, where there is no GPU).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests "$@"
