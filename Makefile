# Entry points. Each target runs the (idempotent, seconds when up to date) set-up first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test quickstart clean-venv

setup:
	@VENV=$(abspath $(VENV)) bash scripts/setup_env.sh

# pytest exits 5 when it collects nothing; say so instead of a bare error code.
test: setup
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; exit $$rc

quickstart: setup
	$(PYTHON) scripts/quickstart.py

clean-venv:
	rm -rf $(VENV)
