# `make test` installs everything on a fresh machine and runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast lint format bench main-job clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU PyTorch first: an unpinned torch would pull a multi-GB CUDA build here.
# On a GPU machine install your CUDA torch before `make install`.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	@# docker-compose (Debian's) only validates docker-compose.yml here; no engine runs
	@command -v docker-compose >/dev/null || apt-get install -y -q docker-compose >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null 2>&1) || \
		echo "docker-compose not installed: the compose validation test will be skipped"
	@# Debian's Chromium for the web UI's browser test (Playwright drives it; no browser download)
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
		echo "chromium not installed: the web UI test will be skipped"

# Two test processes (pytest-xdist), a whole file in one process: most slow tests wait on a
# server that trains on one core, and some files share state across their tests (a Redis
# database they flush, a fixed database name, a module server). The longest files start
# first (tests/conftest.py FILE_SECONDS).
# One torch thread per process (tests/conftest.py). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# Everything but the slow tests (servers, long training): the quick loop while working.
test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The main job: b4m serve on the embedded stack, driven over HTTP with the shipped references.
main-job: install
	$(BIN)/python -m services.main_job --out out/main_job

bench: install
	$(BIN)/python bench/core_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
