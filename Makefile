# The two commands: `make demo` (the main job) and `make test` (the whole suite, slow tests included; `make unit`: the fast unit tests). Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The fixture photos and detector beside the checkout (the default spec names ../../shared/fixtures/models too).
FIXTURES ?= ../shared/fixtures

.PHONY: setup demo test unit lint bench clean

# PyTorch's CPU wheels, when the machine's pip has no wheel folder with them (requirements-compress.txt pins +cpu)
TORCH_INDEX ?=

$(STAMP): requirements.txt requirements-compress.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-compress.txt \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# qemu-user runs ONNX Runtime's AVX2 kernels on any x86 host (tests/unit/test_int8_emulated.py); best effort
EMULATOR := $(VENV)/.emulator
$(EMULATOR): $(STAMP)
	@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user' \
		>/dev/null 2>&1; } || echo "qemu-user not installed: the emulated-AVX2 INT8 test will skip"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/edgestack demo --images $(FIXTURES)/images --out out/demo \
		--pipelines specs/centernet_cascade.yaml specs/centernet_parallel.yaml

# Three pytest-xdist workers on 2 cores (the real-server tests spend much of their time waiting: 3 workers took 505 s,
# 2 took 598 s, 4 took 507 s); tests sharing a server or a module's fixtures stay on one (xdist_group: tests/conftest.py)
XDIST := -n 3 --dist loadgroup --no-loadscope-reorder

test: setup $(EMULATOR)
	$(BIN)/python -m pytest -ra --durations=40 $(XDIST)

lint: setup
	$(BIN)/ruff check .

# The fast unit tests: no variant builds, emulated CPUs or servers (markers: pyproject.toml)
unit: setup
	$(BIN)/python -m pytest -ra $(XDIST) -m "not slow and not integration" tests/unit

bench: setup
	$(BIN)/python benchmarks/ensemble_overhead.py --out BENCHMARKS.md
	$(BIN)/edgestack bench --images $(FIXTURES)/images --requests 40
	$(BIN)/python benchmarks/peer_fastapi.py --seconds 10 --out BENCHMARKS.md

clean:
	rm -rf out model_repository
