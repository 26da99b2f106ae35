# The two commands of the README. Each creates the virtualenv on a fresh machine when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test peers lint typecheck protos train-shapes train-vit shapes-grid evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build that lies on this disk; the project's range accepts it.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The Open Inference Protocol test drives the server with the real tritonclient; its metadata caps
	# protobuf below 7, which the code does not need, so it is installed without its dependency list.
	$(BIN)/pip install --quiet --no-deps tritonclient==2.73.0
	# Debian's prometheus (the Prometheus integration test) and bubblewrap (the pod sandbox test); both tests
	# skip, saying why, where these cannot be installed (not root, or no apt).
	command -v prometheus >/dev/null && command -v bwrap >/dev/null || \
	  ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus bubblewrap >/dev/null ) || \
	  echo "prometheus/bubblewrap not installed: their tests will skip"
	touch $(STAMP)

# The peer-agreement tier: pytorch-grad-cam and Zennit import torchvision, whose binary must match a torch
# build from the registry (about 5 GB with its CUDA libraries), so they get their own environment. The
# local CPU wheel is skipped by ignoring pip's configured find-links for that one install.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): pyproject.toml
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(PEERS_VENV)/bin/pip install --quiet torch==2.13.0 torchvision==0.28.0
	$(PEERS_VENV)/bin/pip install --quiet -e '.[dev,peers]'
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python -m pytest -q -s tests/peers

serve: $(STAMP)
	$(BIN)/saliency-service serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check service clients tests scripts benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy service/saliency_service clients/python/saliency_client

protos: $(STAMP)
	$(BIN)/python scripts/generate_protos.py

# Retrain the embedded model from scratch (seeded) and write it into the shipped repository.
train-shapes: $(STAMP)
	$(BIN)/python -m saliency_service.shapes.train --out build/shapes_state.pt
	$(BIN)/python -m saliency_service.shapes.export --weights build/shapes_state.pt

# Retrain the embedded ViT (seeded; its stem starts from the shipped shapes CNN's weights).
train-vit: $(STAMP)
	$(BIN)/python -m saliency_service.shapes.vit --out service/saliency_service/model_repository

# The evaluation table (every method x every metric) into build/eval; prints table.md to paste into the README.
# `make evaluate N=200 METRICS=all` for the full run.
N ?= 50
METRICS ?= all
evaluate: $(STAMP)
	$(BIN)/saliency-service evaluate --model shapes --n $(N) --metrics $(METRICS) --out build/eval
	cat build/eval/table.md

# Rebuild the DiFull grid model (shapes_grid) from the shipped shapes weights (no training).
shapes-grid: $(STAMP)
	$(BIN)/python -m saliency_service.shapes.grid

clean:
	rm -rf $(VENV) $(PEERS_VENV) build dist .pytest_cache .mypy_cache
