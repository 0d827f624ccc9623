#!/usr/bin/env bash
# Wheels the GPU image lacks, fetched on this (networked) machine into .whl/ for a device run to carry.
#
# The device image (python 3.12, torch, transformers 5.17 with huggingface_hub 1.x) has no datasets, dill or
# multiprocess, and an older transformers than this project is tested with; nothing can be fetched there. This takes
# the versions installed here, so the device runs what CI runs: transformers with the hub it checks for at import
# (and the hub's new HTTP client). benchmarks/gpu_session.sh installs .whl/*.whl with pip --target when the folder
# is there, and falls back to the image's transformers if that set does not import. Run from the repository root:
#
#     bash benchmarks/gpu_wheels.sh          # then carry [".whl"] in the device run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
grep -qsx '/.whl/' .git/info/exclude || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
mkdir -p .whl
for name in datasets dill multiprocess transformers huggingface_hub httpx2 httpcore2 truststore kernels tomlkit; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$name==$version"
done
ls -l .whl
du -sh .whl
