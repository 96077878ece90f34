# hpc_rlhf: every target sets itself up (creates .venv and installs on first use).
#   make demo   - the main job: tiny PPO on CPU (4 gloo processes, TP=2 x DP=2)
#   make test   - style checks + the test suite
#   make demo-pipeline - SFT -> reward model -> PPO -> eval on the tiny model, CPU
#   make bench  - kernels, generation, PPO, reward-model and SFT benchmarks against their
#                 baselines, DPO against TRL's DPOTrainer (installed by tools/install_trl.sh)
#   make bench-grpo - a whole GRPO iteration (generation included) against TRL's GRPOTrainer
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed
NPROC     ?= 4

.PHONY: setup demo demo-pretrain demo-pipeline test lint bench bench-grpo clean

$(STAMP): setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" ninja "setuptools>=64" wheel
	$(PY) -m pip install -q --no-build-isolation -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) \
		-m hpc_rlhf.cli ppo --config examples/configs/ppo_tiny_cpu.yaml

demo-pipeline: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) \
		-m hpc_rlhf.cli pipeline --config examples/configs/pipeline_tiny_cpu.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) \
		-m hpc_rlhf.cli eval --config examples/configs/eval_tiny_cpu.yaml

demo-pretrain: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) \
		-m hpc_rlhf.cli pretrain --config examples/configs/tiny_cpu.yaml

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=40 tests

bench: $(STAMP)
	$(PY) -m pip install -q matplotlib
	$(PY) tools/bench_kernels.py
	$(PY) tools/bench_generate.py
	$(PY) tools/bench_ppo.py --repeat 2 --plot docs/bench_ppo.png
	$(PY) tools/bench_rm.py
	$(PY) tools/bench_sft.py
	bash tools/install_trl.sh
	$(PY) tools/bench_dpo.py

bench-grpo: $(STAMP)
	bash tools/install_trl.sh
	$(PY) tools/bench_grpo.py

clean:
	rm -rf build *.egg-info hpc_rlhf/_C*.so
