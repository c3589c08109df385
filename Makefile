# The Fishr book: `make book` builds the HTML book, `make test` runs every check CI runs.
# Both create .venv on first use and install the locked dependencies into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test unit notebooks book-strict bench clean help execute
help:
	@echo "make book   - build the HTML book into _build/html (stored outputs, no re-execution)"
	@echo "make test   - unit tests, nbval over every chapter (quick profile), strict book build"
	@echo "make bench  - training-step and per-sample-gradient benchmarks (benchmarks/results/)"
	@echo "make clean  - remove _build (keeps .venv)"

# The lock pins exact versions for Python >= 3.11 (numpy 2.4 and pandas 3 need 3.11); on
# Python 3.10 the ranges of pyproject.toml are installed instead, with torch pinned.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock; \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .; \
	else \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[book]"; \
	fi
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build .
	@echo "Open _build/html/index.html"

unit: $(STAMP)
	$(BIN)/python -m pytest tests -q

notebooks: $(STAMP)
	FISHR_PROFILE=quick $(BIN)/python tests/run_notebooks.py

book-strict: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going

test: unit notebooks book-strict

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf _build

# Refresh stored outputs: make execute NB=book/00_colored_mnist_data.ipynb
execute: $(STAMP)
	$(BIN)/python tests/execute_notebooks.py $(NB)
