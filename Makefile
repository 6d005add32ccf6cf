# Every target sets up what it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
COMPOSE_FILE := docker/docker-compose.yml

.PHONY: venv run test test-fast lint bench local-up local-down local-status local-build logs clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

## run: the service on its embedded defaults (local mode, SQLite under ./data, 127.0.0.1:8080)
run: $(STAMP)
	$(VENV)/bin/everreach serve

## test: the whole test suite (real SQLite, Redis, PostgreSQL and uvicorn processes)
test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

bench: $(STAMP)
	$(PY) -m bench

define need_docker
	@command -v docker >/dev/null 2>&1 || { echo "make $@: docker is not installed; install Docker (https://docs.docker.com/get-docker/) or run the service without it: make run"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make $@: the Docker engine is not running; start it (e.g. 'sudo systemctl start docker') or run the service without it: make run"; exit 1; }
endef

local-build:
	$(need_docker)
	docker compose -f $(COMPOSE_FILE) build

local-up:
	$(need_docker)
	@test -f .env || { echo "make local-up: no .env yet; create it with: cp .env.example .env"; exit 1; }
	docker compose -f $(COMPOSE_FILE) up -d

local-down:
	$(need_docker)
	docker compose -f $(COMPOSE_FILE) down

local-status:
	$(need_docker)
	docker compose -f $(COMPOSE_FILE) ps
	@curl -fsS http://127.0.0.1:8080/health || echo "local-terminal is not answering on 127.0.0.1:8080"

logs:
	$(need_docker)
	docker compose -f $(COMPOSE_FILE) logs -f --tail=200 local-terminal

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
