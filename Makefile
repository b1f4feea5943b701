# The whole set-up is two commands: `make demo` and `make test`. Both create or refresh .venv
# (idempotent: nothing is reinstalled unless pyproject.toml changed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench clean java

# --compile-bytecode: the .pyc files are written once here. Where PYTHONDONTWRITEBYTECODE is set
# (as on the CI and development machines), Python never caches them itself, and every process
# (each pytest worker, Spark Python worker, server worker) recompiled TensorFlow (21 s of CPU per
# import, 7 s with the .pyc) and MLflow (7 s, 3 s) from source.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

# Spark needs a Java runtime; install Debian's when the machine has none.
java:
	@command -v java >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q default-jre-headless)

demo: $(STAMP) java
	$(BIN)/deepclick demo

# Two pytest processes (pytest-xdist): one computes while the other waits on a JVM or a server
# start-up; --dist loadfile keeps every test module, and so every module-scoped story, in one.
test: $(STAMP) java
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) java
	$(BIN)/python -m bench.pipeline

clean:
	rm -rf var bench/results .pytest_cache .ruff_cache
