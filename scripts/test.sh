#!/usr/bin/env bash
# The whole test suite against the package as users install it, once per Keras backend (Keras picks its backend
# once per process). Fails when the build, the install or any backend fails.
#
#   1. build the sdist, and the wheel from that sdist (python -m build), into dist/;
#   2. install the wheel with its test extras into a fresh virtual environment (.venv-test/), not the checkout;
#   3. run tests/ with that environment's pytest executable, so the checkout is never on sys.path (KSH_TEST_INSTALLED=1: the
#      suite checks that it imports the installed wheel, that no module is missing from it, and that every
#      documented command — demo, bench, audit, --version — runs from the install).
#
# KSH_BACKENDS="jax" restricts the backends; extra arguments go to pytest. KSH_REUSE_VENV=1 keeps the
# environment's dependencies from the last run and only reinstalls the wheel (quicker; CI starts fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
VENV="${ROOT}/.venv-test"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "=== build: sdist and wheel (dist/)"
"${PYTHON}" -m pip install --quiet "build>=1.2"
rm -rf dist
"${PYTHON}" -m build --outdir dist . >/dev/null
ls dist
wheel=$(ls dist/*.whl)

echo "=== install: ${wheel}[test] into a fresh ${VENV#"${ROOT}"/}"
if [ "${KSH_REUSE_VENV:-0}" = 1 ] && [ -x "${VENV}/bin/python" ]; then
    "${VENV}/bin/python" -m pip install --quiet --force-reinstall --no-deps "${wheel}"
    "${VENV}/bin/python" -m pip install --quiet "${wheel}[test]"
else
    rm -rf "${VENV}"
    "${PYTHON}" -m venv "${VENV}"
    "${VENV}/bin/python" -m pip install --quiet "${wheel}[test]"
fi

export TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0 KSH_TEST_INSTALLED=1
status=0
for backend in ${KSH_BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=${backend}"
    # pytest's own executable, not `python -m pytest` (which would put the checkout first on sys.path, so the
    # checkout's package would be tested instead of the wheel); pyproject's testpaths give tests/.
    # --durations: the slowest tests of each backend, to keep the suite well under its time budget
    KERAS_BACKEND="${backend}" "${VENV}/bin/pytest" -q -p no:cacheprovider --durations=15 "$@" || status=1
done
exit "${status}"
