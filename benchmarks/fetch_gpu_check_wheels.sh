#!/usr/bin/env bash
# Fetch, on a machine WITH network, the wheels benchmarks/gpu_check.py installs on a GPU machine
# WITHOUT network, into the repository's ignored .whl/ folder; then copy the checkout (with .whl/) over.
#
#   benchmarks/fetch_gpu_check_wheels.sh                 # for this machine's Python version
#   PY=3.12 benchmarks/fetch_gpu_check_wheels.sh         # for the GPU machine's Python (major.minor)
#
# Binary wheels only (--only-binary :all:), no dependencies resolved here (--no-deps): the list is
# benchmarks/gpu_check_wheels.txt, measured against a Python holding torch, transformers, accelerate,
# peft, numpy, scipy and pandas. DeepSpeed ships only a source archive: it is built into a wheel here
# with this checkout's .venv (which has torch), without build isolation (no torch download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}
PIP_PYTHON=${PIP_PYTHON:-python3}
mkdir -p .whl
# a second run: back to one flat folder (pip download skips what is there), split again below
find .whl -mindepth 2 -name '*.whl' -exec mv -f {} .whl/ \;
find .whl -mindepth 1 -type d -empty -delete
pins=$(mktemp)
grep -vE '^\s*(#|$)' benchmarks/gpu_check_wheels.txt | grep -v '^deepspeed' > "$pins"
"$PIP_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  --implementation cp -d .whl -r "$pins"
rm -f "$pins"
ds=$(grep '^deepspeed' benchmarks/gpu_check_wheels.txt)
if ! find .whl -name 'deepspeed-*.whl' | grep -q .; then
  "$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation "$ds" -w .whl
fi
# The device machines take at most 64 MiB of ignored files per call: split the wheels into parts of
# at most 60 MiB (.whl/part-1, part-2, ...), one part carried per call (docs/recipes.md, "GPU check").
"$PIP_PYTHON" - <<'PY'
from pathlib import Path

limit = 60 * 2**20
root = Path(".whl")
sizes = {p: p.stat().st_size for p in root.rglob("*.whl")}
parts: list[list[Path]] = []
for wheel in sorted(sizes, key=lambda p: -sizes[p]):
    part = next((q for q in parts if sum(sizes[w] for w in q) + sizes[wheel] <= limit), None)
    if part is None:
        parts.append(part := [])
    part.append(wheel)
for k, part in enumerate(parts, 1):
    folder = root / f"part-{k}"
    folder.mkdir(exist_ok=True)
    for wheel in part:
        if wheel.parent != folder:
            wheel.rename(folder / wheel.name)
    print(f"{folder}: {len(part)} wheels, {sum(sizes[w] for w in part) / 2**20:.1f} MiB")
PY
echo "wheels for Python $PY in .whl/: $(find .whl -type f -name '*.whl' | wc -l) files, $(du -sh .whl | cut -f1)"
