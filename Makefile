# `make demo` and `make test` each set up their own virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines with a local torch build, pin it so pip does not fetch a CUDA build; any torch>=2.4 works.
TORCH ?= torch==2.13.0

.PHONY: demo test bench system-deps clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# Graphviz's `dot` renders the divergence graph; chromium drives the HTML report test.
system-deps:
	@bash .ci/system-deps

demo: $(VENV)/.installed system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

test: $(VENV)/.installed system-deps
	$(PY) -m pytest -q -ra

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench system-deps
	$(PY) benchmarks/capture_overhead.py
	$(PY) benchmarks/capture_memory.py
	$(PY) benchmarks/capture_memory.py --models gpt2-774m --kinds "eager,capture stream,capture summary" --threads 2
	$(PY) benchmarks/torchlens_side_by_side.py
	$(PY) benchmarks/compare_speed.py
	$(PY) benchmarks/matching.py
	$(PY) benchmarks/real_pairs.py
	$(PY) benchmarks/architectures.py
	$(PY) benchmarks/render.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
