# Tessera: `make test` sets up .venv on a fresh machine and runs lint + the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, installed first on machines without an NVIDIA GPU so that nothing
# pulls a multi-GB CUDA build. Elsewhere: TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0
# Real images for the tests and the quickstart: Debian's Fashion-MNIST (IDX files).
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps test lint format clean quickstart

install: system-deps $(VENV)/.installed

system-deps:
	@$(PYTHON) -c "import ensurepip" 2>/dev/null || $(SUDO) apt-get install -y python3-venv \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv; }
	@test -d $(FASHION_MNIST) || $(SUDO) apt-get install -y dataset-fashion-mnist \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }
	@# libjpeg-turbo's headers: the loader's JPEG crop decoder (pipeline/data/jpeg.c) builds on them.
	@test -f /usr/include/jpeglib.h || $(SUDO) apt-get install -y libjpeg-dev \
		|| { $(SUDO) apt-get update && $(SUDO) apt-get install -y libjpeg-dev; }

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU machine: keeping pip's default (CUDA) PyTorch"; \
	else \
		$(BIN)/pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# DeepSpeed compiles its ops on first use: once here, not inside a timed test. Two pytest workers:
# most tests leave a core idle (process start-up, waits on a peer rank); `ray`-marked tests share one.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/tessera build-ops
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25

# The whole pipeline on Fashion-MNIST and digits, under 15 minutes on 2 cores (launch/quickstart.sh).
quickstart:
	launch/quickstart.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
