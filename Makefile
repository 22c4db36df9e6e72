# Two commands do all set-up on a fresh machine:
#   make demo   install (once) and train the default small model on the embedded stdlib corpus
#   make test   install (once) and run the test suite (tests/unit, then tests/integration)
#   make test-fast         the quick unit tests only (no Ray, no DeepSpeed, no training run)
#   make test-integration  the integration tests only (real training runs, Ray, DeepSpeed)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# constraints.txt pins torch to the CPU build (no multi-GB CUDA download) and the versions
# measured together; pyproject.toml keeps loose ranges for GPU users.
PIP    := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

export WANDB_SILENT ?= true
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONWARNINGS ?= ignore::FutureWarning
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-integration bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) -e ".[dev]"
	$(BIN)/python -c "import sheepop.cli, torch, deepspeed, ray, hydra, wandb, tokenizers" 2>/dev/null
# DeepSpeed's CPU communication op, compiled once into this environment's own folder
# (.venv/var/sheepop/torch_extensions), so no run builds it: ~130 CPU-seconds, minutes on 2 cores
	$(BIN)/python -m sheepop.extensions
	touch $@

demo: install
	$(BIN)/sheepop train

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest tests/unit

test-integration: install
	$(BIN)/pytest tests/integration

bench: install
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf outputs wandb .pytest_cache
