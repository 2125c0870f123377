# The two commands a newcomer runs: `make demo` (CPU demo) and `make test` (the whole suite).
PY := .venv/bin/python
export PYTHONWARNINGS := ignore

.PHONY: venv demo test
venv:
	bash scripts/bootstrap.sh

demo: venv
	$(PY) examples/cpu_demo.py

test: venv
	$(PY) -m pytest -q tests
