# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv on first use. Without a CUDA GPU, torch==2.13.0 (CPU build) is installed first,
# so nothing pulls several GB of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cellduality-installed

.PHONY: setup demo demo-check ablation test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  echo "CUDA GPU found: installing the default torch build"; $(PY) -m pip install -q torch; \
	else \
	  echo "No CUDA GPU: installing the CPU build torch==2.13.0 first"; $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,deepspeed,track,eval]"
	@if $(PY) -m pip list 2>/dev/null | grep -qiE '^(nvidia-|triton)' && ! nvidia-smi >/dev/null 2>&1; then \
	  echo "ERROR: CUDA wheels were pulled on a machine without a GPU"; exit 1; fi
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cellduality demo --out demo_out

# the demo's report, written last by the demo: made again only when missing or older than the code,
# the recipes or the set-up that make it (`make demo` always runs the demo)
DEMO_REPORT  := demo_out/report/report.md
DEMO_SOURCES := $(shell find cellduality -name '*.py' -o -name '*.yaml') pyproject.toml constraints.txt

$(DEMO_REPORT): $(STAMP) $(DEMO_SOURCES)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cellduality demo --out demo_out

# the test of what the full demo's report must show (SFT > majority, dual rewards rise, ...), on the
# report of the last `make demo` when the code has not changed since, else after running the demo
demo-check: $(DEMO_REPORT)
	CELLDUALITY_FULL_DEMO=demo_out/report HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_demo.py -k full_demo

# SFT vs dual GRPO vs oracle GRPO over three seeds (resumes when run again); report in ablation_out/report
ablation: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cellduality ablation --out ablation_out

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q --durations=40 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check cellduality sft_data tests benchmarks
	$(VENV)/bin/ruff format --check cellduality sft_data tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/sentences.py
	$(PY) benchmarks/prepare_scale.py --workers 2
	$(PY) benchmarks/dual_overhead.py
	$(PY) benchmarks/teacher_throughput.py
	$(PY) benchmarks/eval_speed.py
	$(PY) benchmarks/cpu_allocator.py
	$(PY) benchmarks/train_speed.py

clean:
	rm -rf $(VENV) demo_out
