# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel these machines hold; any looser spec may pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
EXAMPLE := build/example/model.safetensors

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(EXAMPLE): scripts/make_example.py $(VENV)/.installed
	$(PY) scripts/make_example.py $(EXAMPLE)

demo: install $(EXAMPLE)
	$(VENV)/bin/factorize plan $(EXAMPLE) --min-channels 64
	$(VENV)/bin/factorize apply $(EXAMPLE) build/example/factorized.safetensors --min-channels 64 --force

test: install
	$(PY) -m pytest -q -n auto

bench: install
	$(PY) scripts/bench.py

clean:
	rm -rf build .pytest_cache
