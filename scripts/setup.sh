#!/usr/bin/env bash
# Installs al_ext (editable, with its test tools) into the current Python environment,
# compiled against the torch already there. An existing torch is kept, so a CUDA build
# stays; with none, torch==2.13.0 is installed, which on the project's CPU machines is the
# local CPU wheel (no multi-GB CUDA packages). AL_EXT_TORCH overrides that requirement.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: no torch in $("$PYTHON" -c 'import sys; print(sys.prefix)'); installing ${AL_EXT_TORCH:-torch==2.13.0}"
  "$PYTHON" -m pip install --quiet "${AL_EXT_TORCH:-torch==2.13.0}"
fi
"$PYTHON" -m pip install --quiet "setuptools>=70" wheel ninja
echo "setup: building al_ext against torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
"$PYTHON" -m pip install --quiet --no-build-isolation -e ".[test]"
