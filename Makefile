# TensorStream developer entry points. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
JOBS ?= $(shell nproc)
BUILD ?= build
CMAKE_FLAGS ?= -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTS_PYTHON_INPLACE=ON -DPython_EXECUTABLE=$(shell command -v $(PYTHON))
export PYTHONPATH := $(CURDIR)/python:$(PYTHONPATH)

.PHONY: all deps build test test-cpp test-sanitize test-tsan test-python fuzz fuzz-smoke bench demo install clean \
        container-test

all: build

deps:
	@tools/install_deps.sh

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

test: build
	$(MAKE) --no-print-directory test-cpp test-sanitize test-tsan fuzz-smoke test-python

test-cpp:
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

# The format and store tests again under AddressSanitizer + UndefinedBehaviorSanitizer (clang).
test-sanitize:
	cmake -S . -B $(BUILD)-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ \
	  -DTS_SANITIZE=address,undefined -DTS_BUILD_PYTHON=OFF >/dev/null
	cmake --build $(BUILD)-asan -j $(JOBS)
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --test-dir $(BUILD)-asan --output-on-failure -j $(JOBS)

# The concurrent parts (engine, residency, I/O backends, statistics, the store reader and writer) under
# ThreadSanitizer (clang).
TSAN_TESTS = cuda_test_cuda_device cuda_test_cuda_double cuda_test_cuda_transfer engine_test_device_timing engine_test_engine engine_test_io_queue engine_test_worker_pool residency_test_residency_manager \
             residency_test_prefetcher io_test_io_backend io_test_io_backend_contract io_test_completion_queue \
             io_test_pread_backend io_test_uring_backend io_test_mmap_backend memory_test_host_tier memory_test_staging_pool \
             io_test_mapping_guard stats_test_stats stats_test_trace store_test_store_reader store_test_store_writer
test-tsan:
	cmake -S . -B $(BUILD)-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DTS_SANITIZE=thread -DTS_BUILD_PYTHON=OFF >/dev/null
	cmake --build $(BUILD)-tsan -j $(JOBS) --target $(TSAN_TESTS)
	set -e; for test in $(TSAN_TESTS); do \
	  TSAN_OPTIONS="halt_on_error=1 suppressions=$(CURDIR)/tools/tsan.supp" $(BUILD)-tsan/cpp/tests/$$test --gtest_brief=1; \
	done

$(BUILD)-fuzz/cpp/tests/fuzz_manifest: FORCE
	cmake -S . -B $(BUILD)-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DTS_SANITIZE=address,undefined -DTS_BUILD_FUZZ=ON -DTS_BUILD_PYTHON=OFF >/dev/null
	cmake --build $(BUILD)-fuzz -j $(JOBS) --target fuzz_manifest
FORCE:

# A short libFuzzer run of the manifest parser inside `make test`; `make fuzz` runs longer.
fuzz-smoke: $(BUILD)-fuzz/cpp/tests/fuzz_manifest
	mkdir -p $(BUILD)-fuzz/corpus
	$(BUILD)-fuzz/cpp/tests/fuzz_manifest -max_total_time=20 -print_final_stats=0 $(BUILD)-fuzz/corpus cpp/tests/fuzz/seeds

fuzz: $(BUILD)-fuzz/cpp/tests/fuzz_manifest
	mkdir -p $(BUILD)-fuzz/corpus
	$(BUILD)-fuzz/cpp/tests/fuzz_manifest -max_total_time=$${FUZZ_SECONDS:-600} $(BUILD)-fuzz/corpus cpp/tests/fuzz/seeds

test-python:
	$(PYTHON) -m pytest -q -rs python/tests

# S1-S3 and M1-M3 (benchmarks/run_all.py) in about 14 minutes on a 2-core machine; results in benchmarks/results/.
# Builds docker/Dockerfile on a local Debian base, runs it and checks a completion (tools/container_test.sh; root).
container-test: build
	tools/container_test.sh

bench: build
	$(PYTHON) benchmarks/run_all.py

demo: build
	$(PYTHON) examples/demo.py

install: deps
	$(PYTHON) -m pip install --no-build-isolation .

clean:
	rm -rf $(BUILD) $(BUILD)-asan $(BUILD)-tsan $(BUILD)-fuzz python/tensorstream/_core*.so
