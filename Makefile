# The README's two commands: `make demo` and `make test`. Both set up the environment first.
VENV := .venv
export AMENT_PREFIX_PATH := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env test demo lint

env:
	@bash tools/setup_env.sh

test: env
	$(VENV)/bin/python -m pytest -q

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m mypy

demo: env
	$(VENV)/bin/ttspec demo
