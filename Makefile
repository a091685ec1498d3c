# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build our machines' pip has; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test bench clean

# Debian packages the arena reads offline (Fashion-MNIST); installed when we are root with apt, else skipped
# (the loader then says how to install them).
SYSTEM_PACKAGES ?= dataset-fashion-mnist
SYSTEM_MARKER ?= /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(VENV)/.installed: pyproject.toml
	@if [ ! -e "$(SYSTEM_MARKER)" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES)) || echo "note: could not install $(SYSTEM_PACKAGES)"; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/headwise demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(VENV)/bin/headwise bench patterns --peers --json runs/bench-patterns.json

clean:
	rm -rf $(VENV) build runs .pytest_cache .hypothesis
