# Every target creates the virtual environment on first use: a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The project's modules compiled before the targets that start many Python processes (flow runs, Dask workers,
# the stack's services): each would otherwise compile them again where writing bytecode is turned off
# (PYTHONDONTWRITEBYTECODE), ~0.15 s of CPU per process.
BYTECODE := $(BIN)/python -m compileall -q -j 0 blocks deployments emulators flows operations tasks benchmarks faults

.PHONY: demo test bench faults up down status run samples onboard clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BYTECODE)
	$(BIN)/python -m deployments.demo

# Three xdist workers, each with the session's services of its own: a module's tests on one worker, the modules on
# the deployed stack in two groups with a stack each, the longest first (tests/conftest.py); the slowest tests
# printed at the end.
# Bytecode is written for this run even where the environment turns it off (PYTHONDONTWRITEBYTECODE), so that
# pytest keeps its rewritten test modules: each worker collects every module (~3 s of CPU a worker otherwise).
test: $(STAMP)
	$(BYTECODE)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n 3 --dist loadgroup

bench: $(STAMP)
	$(BYTECODE)
	$(BIN)/python -m benchmarks.run

# The fault-injection suite on a stack of its own (~20 min): make faults FAULTS="--only cancel-products,kill-postgres"
FAULTS ?=
faults: $(STAMP)
	$(BIN)/python -m faults.run $(FAULTS)

up: $(STAMP)
	$(BYTECODE)
	$(BIN)/python -m deployments.stack up

down: $(STAMP)
	$(BIN)/python -m deployments.stack down

status: $(STAMP)
	$(BIN)/python -m deployments.stack status

# make run DEPLOYMENT=generate-games/on-demand PARAMS="quantity=200000 run_key=batch-1"
DEPLOYMENT ?= generate-games/on-demand
run: $(STAMP)
	$(BIN)/python -m deployments.start_run $(DEPLOYMENT) $(PARAMS)

# The sample files of every flow under DATA_DIR/samples, and the command that runs each flow on them.
samples: $(STAMP)
	$(BIN)/python -m deployments.samples

# A seller of the stack's marketplace emulator onboarded (a code from its consent page, exchanged).
onboard: $(STAMP)
	$(BIN)/python -m deployments.marketplace_accounts emulated

clean: down
	rm -rf data/
