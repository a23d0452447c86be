#!/usr/bin/env bash
# The whole test suite, once per Keras backend (Keras picks its backend once per process).
# Installs the package and its test dependencies first (a no-op when they are already installed),
# so it works on a fresh clone. Fails when any backend fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
status=0
for backend in ${KSH_BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=${backend}"
    KERAS_BACKEND="${backend}" python -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit "${status}"
