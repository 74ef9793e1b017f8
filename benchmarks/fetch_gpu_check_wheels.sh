#!/usr/bin/env bash
# Fetch, on a machine WITH network, the wheels benchmarks/gpu_check.py installs on a GPU machine
# WITHOUT network, into the repository's ignored .whl/ folder; then copy the checkout (with .whl/) over.
#
#   benchmarks/fetch_gpu_check_wheels.sh                 # for this machine's Python version
#   PY=3.12 benchmarks/fetch_gpu_check_wheels.sh         # for the GPU machine's Python (major.minor)
#   LIST=benchmarks/gpu_check_wheels_device.txt PY=3.12 benchmarks/fetch_gpu_check_wheels.sh
#                                                        # for the device machines of these sessions
#
# Binary wheels only (--only-binary :all:), no dependencies resolved here (--no-deps): the list is
# benchmarks/gpu_check_wheels.txt (measured against a Python holding only torch, transformers,
# accelerate, peft, numpy, scipy and pandas) or, with LIST=, benchmarks/gpu_check_wheels_device.txt
# (what the device machines' image lacks). DeepSpeed ships only a source archive: it is built into a wheel here
# with this checkout's .venv (which has torch), without build isolation (no torch download).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
BUILD_PYTHON=${BUILD_PYTHON:-.venv/bin/python}
PIP_PYTHON=${PIP_PYTHON:-python3}
LIST=${LIST:-benchmarks/gpu_check_wheels.txt}
WHL=${WHL:-.whl}  # the folder; gpu_check.py --wheels reads it
mkdir -p "$WHL"
# a second run: back to one flat folder (pip download skips what is there), split again below
find "$WHL" -mindepth 2 -name '*.whl' -exec mv -f {} "$WHL"/ \;
find "$WHL" -mindepth 1 -type d -empty -delete
pins=$(mktemp)
grep -vE '^\s*(#|$)' "$LIST" | grep -v '^deepspeed' > "$pins"
"$PIP_PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  --implementation cp -d "$WHL" -r "$pins"
rm -f "$pins"
ds=$(grep '^deepspeed' "$LIST")
if ! find "$WHL" -name 'deepspeed-*.whl' | grep -q .; then
  "$BUILD_PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation "$ds" -w "$WHL"
fi
# A device call of these sessions carries at most 64 MiB, the checkout (about 9 MiB) included: split
# the wheels into parts of at most PART_MIB (default 50) MiB, .whl/part-1, part-2, ..., one part
# carried per call (docs/recipes.md, "GPU check"). A wheel larger than that gets a part of its own.
WHL="$WHL" PART_MIB=${PART_MIB:-50} "$PIP_PYTHON" - <<'PY'
import os
from pathlib import Path

limit = int(os.environ["PART_MIB"]) * 2**20
root = Path(os.environ["WHL"])
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
echo "wheels for Python $PY in $WHL: $(find "$WHL" -type f -name '*.whl' | wc -l) files, $(du -sh "$WHL" | cut -f1)"
