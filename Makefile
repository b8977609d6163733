# `make demo` and `make test` work on a fresh Linux machine: tools/setup.sh installs what they need, idempotently.
PY := .venv/bin/python

.PHONY: setup demo test lint bench clean
setup:
	@bash tools/setup.sh

demo: setup
	@$(PY) tools/demo.py

test: setup
	@$(PY) -m ruff check edge_llama tests tools
	@$(PY) -m pytest -q -rs

lint: setup
	@$(PY) -m ruff check edge_llama tests tools

bench: setup
	@$(PY) tools/bench/overhead.py
	@$(PY) tools/bench/safety.py
	@$(PY) tools/bench/awq_quality.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
