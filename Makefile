# The two commands of the README. Each creates the virtualenv on a fresh machine when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck protos train-shapes clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build that lies on this disk; the project's range accepts it.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

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

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache
