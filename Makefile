# Every target sets up what it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
COMPOSE_FILE := docker/docker-compose.yml

.PHONY: help venv run test test-fast lint bench bench-quick docs local-up local-down local-status local-build logs clean
.DEFAULT_GOAL := help

## help: this list (the default goal: `make` alone prints it)
help:
	@echo "usage: make TARGET"
	@awk '/^## [a-z-]+: / { line = substr($$0, 4); name = substr(line, 1, index(line, ":") - 1); \
	  printf "  %-13s %s\n", name, substr(line, length(name) + 3) }' $(firstword $(MAKEFILE_LIST))

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --config-settings editable_mode=compat -e .
	touch $(STAMP)

## venv: create .venv with the project and its development tools
venv: $(STAMP)

## run: the service on its embedded defaults (local mode, SQLite under ./data, 127.0.0.1:8080)
run: $(STAMP)
	$(VENV)/bin/everreach serve

## test: the whole test suite (real SQLite, Redis, PostgreSQL and uvicorn processes)
test: $(STAMP)
	$(PY) -m pytest -q

## test-fast: the tests that start no child process (no servers, workers or tools), in seconds
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not process" --forbid-processes

## lint: ruff check, ruff format --check and mypy
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

## bench: every benchmark, full length, in the shipped configuration (python -m bench; minutes)
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || echo "make $@: wrk is not installed, so the req/s figures get no verdict; install it (Debian/Ubuntu: sudo apt-get install wrk; macOS: brew install wrk)"
	$(PY) -m bench

## docs: build the documentation site into site/ (strict: a broken link or anchor fails)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## bench-quick: a smoke run of every benchmark (python -m bench --quick)
bench-quick: $(STAMP)
	$(PY) -m bench --quick

# `docker compose` (v2 plugin) if present, else the standalone `docker-compose`. Lazy (=), so
# targets that do not use Docker never run these probes.
DOCKER_COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || { command -v docker-compose >/dev/null 2>&1 && echo docker-compose; })
# .env feeds ${EVERREACH_ENV} in the compose file too (compose would otherwise look in docker/).
COMPOSE = $(DOCKER_COMPOSE) $(if $(wildcard .env),--env-file .env) -f $(COMPOSE_FILE)
# The image's user gets the uid of whoever owns ./data (root runs get 1000, see local-up).
APP_UID = $(shell u=$$(id -u); [ "$$u" = 0 ] && echo 1000 || echo $$u)

define need_docker
	@command -v docker >/dev/null 2>&1 || { echo "make $@: docker is not installed; install Docker (https://docs.docker.com/get-docker/) or run the service without it: make run"; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make $@: the Docker engine is not running; start it (e.g. 'sudo systemctl start docker') or run the service without it: make run"; exit 1; }
	@test -n "$(DOCKER_COMPOSE)" || { echo "make $@: Docker Compose is not installed (neither 'docker compose' nor 'docker-compose'); see https://docs.docker.com/compose/install/"; exit 1; }
endef

define need_env_file
	@test -f .env || { echo "make $@: no .env yet; create it with: cp .env.example .env  (then set LOCAL_API_TOKEN)"; exit 1; }
endef

## local-build: build the Docker image (needs .env)
local-build:
	$(need_docker)
	$(need_env_file)
	APP_UID=$(APP_UID) $(COMPOSE) build

## local-up: start the Docker stack in the background (needs LOCAL_API_TOKEN in .env)
local-up:
	$(need_docker)
	$(need_env_file)
	@grep -Eq '^[[:space:]]*LOCAL_API_TOKEN=[^[:space:]]+' .env || { echo "make local-up: set LOCAL_API_TOKEN in .env: the container listens on 0.0.0.0 and the server refuses that without a token. Make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"; exit 1; }
	@mkdir -p data/sqlite data/chroma data/redis
	@if [ "$$(id -u)" = 0 ]; then chown $(APP_UID):$(APP_UID) data/sqlite; fi
	APP_UID=$(APP_UID) $(COMPOSE) up -d

## local-down: stop the Docker stack
local-down:
	$(need_docker)
	$(need_env_file)
	$(COMPOSE) down

## local-status: the Docker stack's containers and /health
local-status:
	$(need_docker)
	$(need_env_file)
	$(COMPOSE) ps
	@curl -fsS http://127.0.0.1:8080/health || echo "local-terminal is not answering on 127.0.0.1:8080"

## logs: follow the Docker stack's logs
logs:
	$(need_docker)
	$(need_env_file)
	$(COMPOSE) logs -f --tail=200 --no-log-prefix local-terminal

## clean: remove .venv and the caches
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build site *.egg-info
