# Two commands on a fresh clone: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench study lint setup browser clean

setup: $(STAMP)

# torch is pinned and installed first: 2.13.0 is the CPU wheel on local disk; anything
# unpinned would pull several GB of CUDA builds. pyproject's range admits this pin.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[keras,keras-backends,lightning,transformers,tensorboard,web,ray,dev]'
	touch $(STAMP)

# Debian's chromium for the browser tests (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

demo: $(STAMP)
	$(BIN)/gradwatch demo

test: $(STAMP) browser
	$(BIN)/ruff check .
	KERAS_BACKEND=torch $(BIN)/python -m pytest -q -n 2 tests
	# the Keras callback on its other backends, each in its own process (a backend is chosen once per process)
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest -q -p no:xdist tests/test_keras_backends.py
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q -p no:xdist tests/test_keras_backends.py

bench: $(STAMP)
	$(BIN)/python benchmarks/monitor_overhead.py
	$(BIN)/python benchmarks/sweep_throughput.py
	$(BIN)/python benchmarks/store_scale.py
	$(BIN)/python benchmarks/sweep_throughput.py --workload criticality
	for backend in torch tensorflow jax; do KERAS_BACKEND=$$backend $(BIN)/python benchmarks/keras_overhead.py; done

study: $(STAMP)
	$(BIN)/gradwatch study all

clean:
	rm -rf $(VENV) gradwatch-runs gradwatch-report
