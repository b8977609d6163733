# `make demo` and `make test` work on a fresh Linux machine: tools/setup.sh installs what they need, idempotently.
PY := .venv/bin/python

.PHONY: setup demo voice-demo test lint bench clean
setup:
	@bash tools/setup.sh

demo: setup
	@$(PY) tools/demo.py

# Speaks the daemon's answer to a bundled spoken question (edge_llama/data/voice/question.wav) into voice-demo.wav.
voice-demo: setup
	@HF_HUB_OFFLINE=1 $(PY) tools/voice_demo.py

test: setup
	@$(PY) -m ruff check edge_llama tests tools
	@$(PY) -m pytest -q -rs

lint: setup
	@$(PY) -m ruff check edge_llama tests tools

bench: setup
	@$(PY) tools/bench/peer.py
	@$(PY) tools/bench/ngram.py
	@$(PY) tools/bench/kv_cache.py
	@$(PY) tools/bench/overhead.py
	@$(PY) tools/bench/trtllm_overhead.py
	@$(PY) tools/bench/structured.py
	@$(PY) tools/bench/tool_calls.py
	@$(PY) tools/bench/ha_prompt.py
	@$(PY) tools/bench/http_overhead.py
	@$(PY) tools/bench/safety.py
	@$(PY) tools/bench/reliability.py
	@HF_HUB_OFFLINE=1 $(PY) tools/bench/voice.py
	@HF_HUB_OFFLINE=1 $(PY) tools/bench/wyoming.py
	@$(PY) tools/bench/awq_quality.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
