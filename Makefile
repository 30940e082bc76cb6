# Every target builds .venv from nothing when it is missing, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# 8 fake CPU devices, so sharding code runs on any machine.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export PJRT_DEVICE ?= CPU
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,infer,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m flax_train.demo --run-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.train_throughput
	$(BIN)/python -m benchmarks.prepare_throughput --out benchmarks/results/prepare_throughput_cpu.json
	$(BIN)/python -m benchmarks.infer_latency

clean:
	rm -rf $(VENV) runs
