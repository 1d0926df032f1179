# One-command set-up: `make demo` and `make test` create .venv and install everything.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/datasets
DEMO_DB ?= demo.db
POLYREC := $(BIN)/polyrec --db $(DEMO_DB)

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# torch and torchvision are pinned here: these versions come from the machine's local
# package mirror (torchvision is needed by open_clip); others download gigabytes.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[serve,test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm
	$(POLYREC) init
	$(POLYREC) ingest items $(DATA)/ml-100k/ml-100k.item
	$(POLYREC) ingest users $(DATA)/ml-100k/ml-100k.user
	$(POLYREC) ingest interactions $(DATA)/ml-100k/ml-100k.inter
	$(POLYREC) ingest kg $(DATA)/ml-100k/ml-100k.kg --links $(DATA)/ml-100k/ml-100k.link
	$(POLYREC) stats
	$(POLYREC) encode --encoder bert --encoder kg
	$(POLYREC) train
	$(POLYREC) recommend 1 -k 5 --explain
	$(POLYREC) recommend 42 -k 5 --explain --diversity 0.3
	$(POLYREC) recommend 405 -k 5 --explain --filter class=Comedy
	$(POLYREC) evaluate --models popular,itemknn,ease,hybrid

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the fast loop: everything but the tests marked slow (over ~5 s each)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py $(if $(wildcard $(DEMO_DB)),--db $(DEMO_DB))

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm .pytest_cache
