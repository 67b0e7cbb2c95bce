# kanerva-lab. On a fresh machine the only two commands you need are `make demo` and `make test`:
# both create the virtual environment (.venv) first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KM := $(VENV)/bin/km
# Data: KM_DATA_DIR if set, else ../shared/data (resolved by the data modules).

.PHONY: setup demo test lint bench gpu-check sweep compare clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-cpu.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: about 2 minutes) ..."
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-cpu.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps sweeps==0.3.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@touch $@

demo: setup
	$(KM) train experiment=demo

# make test (what CI runs) lints first: ruff check and ruff format --check, about a second
test: setup lint
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check km datamodules tests bench
	$(VENV)/bin/ruff format --check --quiet km datamodules tests bench

bench: setup
	$(PY) bench/data.py
	$(PY) bench/memory.py
	$(PY) bench/startup.py
	@echo "denoising (needs trained runs): $(PY) bench/denoise.py RUN_DIR..."

# One-shot device check (bench/gpu.py): every model at the papers' sizes on CUDA (tiny sizes on a CPU):
# step time, images/s, peak memory, bf16 vs fp32 loss, torch.compile on and off, the sampler on the device
gpu-check: setup
	$(PY) bench/gpu.py

# make sweep SWEEP=sweeps/compare_baselines.yaml [COUNT=4]: a local (offline) sweep, then its report
SWEEP ?= sweeps/compare_baselines.yaml
COUNT ?=
sweep: setup
	@D=$$($(KM) sweep start $(SWEEP) --local) && echo "sweep dir: $$D" && \
	$(KM) sweep agent $$D $(if $(COUNT),--count $(COUNT),) && $(KM) sweep status $$D && $(KM) compare $$D

# make compare RUNS="runs/<name>": tables and plots across runs
RUNS ?= runs
compare: setup
	$(KM) compare $(RUNS)

clean:
	rm -rf $(VENV) runs .pytest_cache
