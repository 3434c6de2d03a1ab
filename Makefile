# featx: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The torch + torchvision pair that imports on our 2-core build machines
# (shared/ENVIRONMENT.md); override on other platforms: make TORCH_PAIR="torch torchvision"
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.featx-installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# constraints.txt pins the whole tested stack (pip freeze of a green run): no resolver backtracking
# (botocore/aiobotocore/moto can otherwise take many minutes to resolve) and the same versions as CI.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PAIR)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -c "import torch, torchvision, ray, transformers, timm, pyarrow, duckdb, moto, importlinter"
	touch $(STAMP)

demo: install
	$(BIN)/featx demo

# Two pytest workers, one test file each at a time (module fixtures are built once): most tests wait on
# process and Ray start-up, so two of them share 2 cores well. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

# lint-imports first: the layers of shared/DESIGN.md (contracts in pyproject.toml) fail fast, before any test
test: install
	$(BIN)/lint-imports
	$(PYTEST) tests

test-fast: install
	$(BIN)/lint-imports
	$(PYTEST) tests -m "not slow"

bench: install
	$(BIN)/python benchmarks/embed_throughput.py

clean:
	rm -rf $(VENV) featx-demo .pytest_cache
