# Set-up and everyday commands. `make ioc` and `make test` work on a fresh machine:
# they create .venv and install the project with what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,screens]'
	touch $(STAMP)

.PHONY: ioc server test lint bench generate
ioc: $(STAMP)  ## run the IOC on the embedded DM service (state under var/apsdm)
	$(BIN)/apsdm-ioc $(ARGS)

server: $(STAMP)  ## run the embedded DM service alone
	$(BIN)/apsdm-server --data-root var/apsdm/dm $(ARGS)

test: $(STAMP)  ## lint, then every test (the slow and render ones included), on two workers
	$(BIN)/ruff check ioc ophyd_devices tests bench
	$(BIN)/python -m pytest -n 2 --dist loadgroup --max-worker-restart 0 $(ARGS)

bench: $(STAMP)  ## benchmarks, printed as ratios against references run alongside
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

generate: $(STAMP)  ## regenerate db/ and opi/ from the PV schema
	$(BIN)/python -m apsdm.gateway.generate
