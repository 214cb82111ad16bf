# Fresh-machine entry points. Every target installs what it needs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PROMPT ?= a red circle moving right on a black background
OUT ?= raven.mp4

.PHONY: setup setup-tests demo test test-fast lint bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch that lies on this machine's disk; ranges below admit it.
	$(PIP) install --quiet torch==2.13.0
	touch $@

setup: $(VENV)/.created
	$(PIP) install --quiet -e ".[video]"

setup-tests: $(VENV)/.created
	@command -v ffmpeg >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq ffmpeg chromium g++ >/dev/null) || echo "warning: could not install ffmpeg/chromium/g++"; }
	$(PIP) install --quiet -e ".[tests,video,space]"

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffusers-raven generate --prompt "$(PROMPT)" --output $(OUT)

test: setup-tests
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q --timeout=900 tests

test-fast: setup-tests
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -x --timeout=900 tests -m "not slow"

lint: $(VENV)/.created
	$(PIP) install --quiet "ruff>=0.6"
	$(VENV)/bin/ruff check src tests benchmarks trainers spaces

bench: setup-tests
	for b in benchmarks/bench_*.py; do HF_HUB_OFFLINE=1 $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info
