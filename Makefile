# One-command set-up: `make demo` and `make test` create .venv and install everything.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DATA    ?= ../shared/datasets
DEMO_DB ?= demo.db
POLYREC := $(BIN)/polyrec --db $(DEMO_DB)

.PHONY: install chromium demo test test-fast bench clean

install: $(STAMP)

# torch and torchvision are pinned here: these versions come from the machine's local
# package mirror (torchvision is needed by open_clip); others download gigabytes.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[serve,test,bench,quant,postgres,ray,plot,thesaurus]"
	touch $(STAMP)

# The browser tests (tests/test_browser*.py) drive Debian's Chromium through Playwright
# (never `playwright install`: it downloads a browser build). Installed once, as root.
CHROMIUM ?= /usr/bin/chromium
chromium: $(CHROMIUM)

$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get update && apt-get install -y --no-install-recommends chromium fonts-dejavu-core'

# Each demo step runs through $(call step,NAME,COMMAND): its wall time goes to $(STEPS),
# printed as a table at the end.
STEPS   := $(DEMO_DB).steps
comma   := ,
define step
	@echo "+ $(2)"; start=$$(date +%s%N); $(2) || exit $$?; \
	  printf '  %-34s %7.1f s\n' "$(1)" "$$(( ($$(date +%s%N) - start) / 1000000 ))e-3" >> $(STEPS)
endef

demo: $(STAMP)
	@rm -f $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(STEPS)
	$(call step,init,$(POLYREC) init)
	$(call step,ingest items,$(POLYREC) ingest items $(DATA)/ml-100k/ml-100k.item)
	$(call step,ingest users,$(POLYREC) ingest users $(DATA)/ml-100k/ml-100k.user)
	$(call step,ingest interactions,$(POLYREC) ingest interactions $(DATA)/ml-100k/ml-100k.inter)
	$(call step,ingest kg + links,$(POLYREC) ingest kg $(DATA)/ml-100k/ml-100k.kg --links $(DATA)/ml-100k/ml-100k.link)
	$(call step,stats,$(POLYREC) stats)
	$(call step,encode bert + kg,$(POLYREC) encode --encoder bert --encoder kg)
	$(call step,train (default hybrid),$(POLYREC) train)
	$(call step,recommend 1,$(POLYREC) recommend 1 -k 5 --explain)
	$(call step,recommend 42 (diversity),$(POLYREC) recommend 42 -k 5 --explain --diversity 0.3)
	$(call step,recommend 405 (filter),$(POLYREC) recommend 405 -k 5 --explain --filter class=Comedy)
	$(call step,evaluate 4 models,$(POLYREC) evaluate --models popular$(comma)itemknn$(comma)ease$(comma)hybrid)
	@echo; echo "Step times (make demo):"; cat $(STEPS); \
	  awk '{ total += $$(NF-1) } END { printf "  %-34s %7.1f s\n", "total", total }' $(STEPS)
	@echo; echo "Admin pages (docs/admin.md): run"; \
	  echo "  $(POLYREC) serve"; \
	  echo "then open http://127.0.0.1:8000/ (API docs: http://127.0.0.1:8000/docs)"

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

# the fast loop: everything but the tests marked slow (over ~5 s each)
test-fast: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py $(if $(wildcard $(DEMO_DB)),--db $(DEMO_DB))

clean:
	rm -rf $(VENV) $(DEMO_DB) $(DEMO_DB)-wal $(DEMO_DB)-shm $(DEMO_DB).polyrec-index $(STEPS) .pytest_cache
