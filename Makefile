# troupe: `make run` sets up and runs the demo; `make test` sets up and runs the tests.
VARIANT ?= cpu
PY := .venv/bin/python

.PHONY: setup run rm-demo test test-fast test-slow bench bench-engine
setup: .venv/.troupe-$(VARIANT)

.venv/.troupe-$(VARIANT): pyproject.toml scripts/setup.sh constraints/$(VARIANT).txt
	bash scripts/setup.sh $(VARIANT)
	touch $@

run: setup
	.venv/bin/troupe train configs/arith_cpu.yaml

rm-demo: setup
	bash scripts/rm_demo.sh

test: setup
	bash scripts/test.sh

test-fast: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

bench: setup
	$(PY) bench/bench_reward.py

bench-engine: setup
	$(PY) bench/bench_engine.py --vllm-defaults
