# Entry points. Each target runs the (idempotent, seconds when up to date) set-up first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup lint test test-quick quickstart clean-venv

setup:
	@VENV=$(abspath $(VENV)) bash scripts/setup_env.sh

lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# pytest exits 5 when it collects nothing; say so instead of a bare error code.
test: lint
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; exit $$rc

# The sub-minute loop: everything but the end-to-end runs (CI runs them all, via `make test`).
test-quick: setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

QUICKSTART_CONFIG ?= configs/quickstart/FCOS_R_18_shapes.yaml
QUICKSTART_OUTPUT ?= output/quickstart/FCOS_R_18_shapes
# Extra config overrides, e.g. QUICKSTART_OPTS="SOLVER.AMP.CPU_BF16 never" (float32 on any CPU).
QUICKSTART_OPTS ?=

# Train on the embedded shapes dataset, evaluate on its val split, draw predictions on val images.
quickstart: setup
	$(PYTHON) train_net.py --config-file $(QUICKSTART_CONFIG) OUTPUT_DIR $(QUICKSTART_OUTPUT) \
		$(QUICKSTART_OPTS)
	$(PYTHON) demo.py --config-file $(QUICKSTART_CONFIG) --dataset shapes_val --max-images 12 \
		--output $(QUICKSTART_OUTPUT)/predictions MODEL.WEIGHTS $(QUICKSTART_OUTPUT)/model_final.pth \
		$(QUICKSTART_OPTS)
	@echo "Pictures of predictions: $(QUICKSTART_OUTPUT)/predictions/"

clean-venv:
	rm -rf $(VENV)
