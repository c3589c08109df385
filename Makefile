# The Fishr book: `make book` builds the HTML book, `make test` runs every check CI runs.
# Both create .venv on first use and install the locked dependencies into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: book test prerequisites unit unit-torch notebooks book-strict site-check colab-path pdf bench clean help execute
help:
	@echo "make book   - build the HTML book into _build/html (stored outputs, no re-execution)"
	@echo "make test   - unit tests, nbval over every chapter (quick profile), strict book build,"
	@echo "              site check in headless chromium, Colab-path test (checks chromium, npm"
	@echo "              and g++ first: installs them as root with apt, else prints the command)"
	@echo "make unit   - the unit tests alone; FAST=1 skips the slow ones (pytest -m 'not slow')"
	@echo "make unit-torch TORCH=2.2.2 - the unit tests under another torch release, in .cache/venv-torch2.2.2"
	@echo "make site-check - strict build, then every page rendered in Debian's chromium: images,"
	@echo "              internal links and math checked, screenshots in _build/screenshots"
	@echo "make colab-path - a chapter's setup cell run as on Colab, in a fresh virtual environment"
	@echo "make pdf    - the book as one PDF, _build/latex/fishr-book.pdf (needs TeX Live with xelatex)"
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
	$(BIN)/python -m pytest tests -q $(if $(FAST),-m "not slow")

# The unit tests under another torch release (PyPI's build, with CUDA: a few GB), the other
# packages at their locked versions; EXTRA overrides some, e.g. torch 2.2 needs NumPy 1:
#   make unit-torch TORCH=2.2.2 EXTRA="numpy==1.26.4 pandas==2.2.3"
TORCH_VENV := .cache/venv-torch$(TORCH)
unit-torch:
	@test -n "$(TORCH)" || { echo 'usage: make unit-torch TORCH=2.2.2 [EXTRA="numpy==1.26.4 pandas==2.2.3"]'; exit 2; }
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	grep -v '^torch==' requirements.lock > $(TORCH_VENV)/lock-without-torch.txt
	$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==$(TORCH)
	$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(TORCH_VENV)/lock-without-torch.txt
	$(if $(EXTRA),$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(EXTRA))
	$(TORCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(TORCH_VENV)/bin/python -m pytest tests -q -p no:cacheprovider

notebooks: $(STAMP)
	FISHR_PROFILE=quick $(BIN)/python tests/run_notebooks.py

book-strict: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going

# MathJax 3 from npm stands in for the CDN copy the site loads, so the check runs offline.
MATHJAX := .cache/site-check/node_modules/mathjax/es5/tex-mml-chtml.js
$(MATHJAX):
	npm install --prefix .cache/site-check --no-audit --no-fund --silent mathjax@3.2.2

site-check: book-strict $(MATHJAX)
	$(BIN)/python tests/check_site.py _build/html

colab-path: $(STAMP)
	$(BIN)/python tests/check_colab_path.py

prerequisites:
	@bash tests/check_prerequisites.sh

test: prerequisites unit notebooks book-strict site-check colab-path

pdf: $(STAMP)
	$(BIN)/jupyter-book build . --builder pdflatex

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf _build

# Refresh stored outputs: make execute NB=book/06_colored_mnist_data.ipynb
execute: $(STAMP)
	$(BIN)/python tests/execute_notebooks.py $(NB)

# The student edition: every chapter with its solutions replaced by empty answer cells and its
# outputs stripped, in _build/student/book/ (published on the branch `student`).
.PHONY: student
student:
	$(PYTHON) tools/student_edition.py
