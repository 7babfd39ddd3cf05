# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out
MODEL  := $(OUT)/models/tiny

.PHONY: demo test test-slow env browser clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

$(MODEL)/.done: $(VENV)/.installed
	$(BIN)/wanstream init-random --preset tiny $(MODEL)
	touch $@

demo: $(MODEL)/.done
	$(BIN)/wanstream clip $(OUT)/input.mp4 --frames 49 --resolution 160x96 --fps 16
	$(BIN)/wanstream v2v $(OUT)/input.mp4 -o $(OUT)/output.mp4 --model $(MODEL) \
	    --prompt "a watercolor painting of a city street" --steps 2 --seed 1
	@echo "demo: input $(OUT)/input.mp4 → restyled $(OUT)/output.mp4 (tiny random weights: expect noise, not art)"

# The real-browser tests need Debian's chromium and playwright; the script is idempotent and skips itself
# when it cannot install (not root), in which case those tests skip with a reason.
browser: $(VENV)/.installed
	@if [ -x scripts/install_browser.sh ]; then VENV=$(VENV) scripts/install_browser.sh; fi

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q

# The long cases (marked `slow`, each with a fast representative in `make test`).
test-slow: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(OUT) $(VENV) .pytest_cache
