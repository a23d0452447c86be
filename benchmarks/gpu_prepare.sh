#!/usr/bin/env bash
# Prepare benchmarks/gpu_run.sh on the developer's machine (no GPU needed), right before the `run` call:
#
#   bash benchmarks/gpu_prepare.sh
#
# - .whl/: the wheels the GPU image lacks (Keras, at the version installed here, and its pure-Python needs namex
#   and optree, which has a cp312 build), for CPython 3.12 on manylinux x86-64, fetched from PyPI with pip if
#   missing; the folder is kept out of git through .git/info/exclude and travels with `carry: [".whl"]`.
# - .whl/SOURCE_COMMIT: this checkout's commit, which the records carry (the GPU machine gets the working tree
#   without the repository's history).
# Then prints the `run` call (the same as in docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
mkdir -p .whl
version() { python3 -c "from importlib import metadata; print(metadata.version('$1'))" 2>/dev/null || echo "$2"; }
for spec in "keras==$(version keras 3.15.1)" "namex==$(version namex 0.1.0)" "optree==$(version optree 0.20.0)"; do
    name=${spec%%==*}
    if ls .whl/"${name}"-"${spec#*==}"-*.whl >/dev/null 2>&1; then continue; fi
    rm -f .whl/"${name}"-*.whl  # one version of each: two would stop the install
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
git rev-parse --short HEAD >.whl/SOURCE_COMMIT
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "note: tracked files have uncommitted changes; the records will name $(cat .whl/SOURCE_COMMIT) all the same"
fi
ls -l .whl
cat <<'EOF'

Now the run call (device tool), then: python benchmarks/gpu_collect.py <files_at of the reply>
  run(command="bash benchmarks/gpu_run.sh --budget 420", carry=[".whl"], timeout_s=480)
EOF
