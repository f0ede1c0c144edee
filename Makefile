# `make demo` and `make test` work on a fresh machine: they create .venv and install dforce first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned here, the rest by constraints.txt (the set the suite last passed with; `make lock`
# refreshes it). Without an NVIDIA GPU the CPU build: PyPI's Linux wheel is a multi-GB CUDA build, so on
# Linux the `+cpu` one, from a local wheelhouse if pip's config names one, else from PyTorch's CPU index.
# Pick another build with `make install TORCH=...`.
TORCH_VERSION := 2.13.0
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH ?= $(shell if ! command -v nvidia-smi >/dev/null 2>&1 && [ "$$(uname -s)" = Linux ]; \
	then echo "torch==$(TORCH_VERSION)+cpu"; else echo "torch==$(TORCH_VERSION)"; fi)
# $(call install_torch,BIN): the CPU index only when pip's own indexes lack the build
install_torch = $(1)/python -m pip install --quiet "$(TORCH)" 2>/dev/null || \
	$(1)/python -m pip install --quiet "$(TORCH)" --extra-index-url $(CPU_INDEX)

.PHONY: demo self-forcing-demo self-forcing-bidirectional-demo gpu-bundle ablation test lint install lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(call install_torch,$(BIN))
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

# Re-resolve the newest versions pyproject.toml admits in a scratch venv, then write them to constraints.txt;
# run `make test` before committing the new set.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	$(call install_torch,.venv-lock/bin)
	.venv-lock/bin/python -m pip install --quiet -e ".[dev]"
	( echo "# The tested set of dforce's dependencies (torch is pinned in the Makefile). Refresh: make lock"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E "^(torch|nvidia-|triton)" ) \
	  > constraints.txt
	rm -rf .venv-lock

# The demo: bouncing-balls shards (made once; one ball on 16x16 frames), a small model trained on them
# (configs/demo.yaml; rerun to resume), a rollout 8x past its 8-frame horizon beside the real clip, its
# scores on 32 held-out clips against copying the last frame, and the weighting heatmaps. Sampling (10 steps,
# history guidance 1.25) is what the model was validated with: its sampling.json, from configs/demo.yaml.
demo: install outputs/demo/balls/train-000003.tar outputs/demo/balls/val-000000.tar
	$(BIN)/dforce train configs/demo.yaml
	$(BIN)/dforce sample --model outputs/demo/run/model --context "outputs/demo/balls/val-*.tar" \
		--context-frames 4 --frames 60 --seed 0 --out outputs/demo/rollout.mp4
	$(BIN)/dforce eval --model outputs/demo/run/model --data "outputs/demo/balls/val-*.tar" --clips 32 \
		--context-frames 4 --frames 60 --elbo-draws 0 --out outputs/demo/eval
	$(BIN)/dforce plot-weights --frames 2 --levels 16 --out outputs/demo/weights_2frames.png

# Self-forcing on the demo's model (made by `make demo` if missing): a 4-step generator trained on its own
# rollouts against the guided teacher (configs/self_forcing_demo.yaml; rerun to resume), then both scored
# 8x past the horizon on the same clips and seed, side by side (balls found, ball error and speed by
# horizon multiple, with standard errors; frames per second), and a rollout beside the real clip. Each model
# samples as its sampling.json says: the teacher 10 steps guided, the generator its 4-step grid.
self-forcing-demo: install outputs/demo/run/model/noise.json
	$(BIN)/dforce train configs/self_forcing_demo.yaml
	$(BIN)/dforce eval --model outputs/demo/run/model --data "outputs/demo/balls/val-*.tar" --clips 32 \
		--context-frames 4 --frames 60 --elbo-draws 0 --out outputs/demo/eval_teacher
	$(BIN)/dforce eval --model outputs/demo/self_forcing/model --data "outputs/demo/balls/val-*.tar" --clips 32 \
		--context-frames 4 --frames 60 --elbo-draws 0 --out outputs/demo/eval_self_forcing
	$(BIN)/dforce compare outputs/demo/eval_teacher outputs/demo/eval_self_forcing \
		--names "teacher (10 steps guided),self-forcing (4 steps)" --out outputs/demo/self_forcing_vs_teacher.md
	$(BIN)/dforce sample --model outputs/demo/self_forcing/model --context "outputs/demo/balls/val-*.tar" \
		--context-frames 4 --frames 60 --seed 0 --out outputs/demo/self_forcing_rollout.mp4

# Self-forcing from a bidirectional teacher (configs/self_forcing_bidirectional_demo.yaml): a balls model with
# full attention over its horizon, trained with sync, is the teacher and the critic's start; the generator
# starts from the demo's causal model. Scored as above against the generator's start sampled the same way
# (4 steps, unguided) and against the teacher of `make self-forcing-demo` where that has run.
self-forcing-bidirectional-demo: install outputs/demo/run/model/noise.json
	$(BIN)/dforce train configs/demo.yaml output_dir=outputs/demo/bidirectional model.frames_per_block=8 \
		trajectory.name=sync loss.drop_history=0 validation.shards=null validation.history_guidance=1
	$(BIN)/dforce train configs/self_forcing_bidirectional_demo.yaml
	$(BIN)/dforce eval --model outputs/demo/run/model --data "outputs/demo/balls/val-*.tar" --clips 32 \
		--context-frames 4 --frames 60 --elbo-draws 0 --steps 4 --history-guidance 1 --out outputs/demo/eval_start
	$(BIN)/dforce eval --model outputs/demo/self_forcing_bidirectional/model --data "outputs/demo/balls/val-*.tar" \
		--clips 32 --context-frames 4 --frames 60 --elbo-draws 0 --out outputs/demo/eval_self_forcing_bidirectional
	$(BIN)/dforce compare outputs/demo/eval_start outputs/demo/eval_self_forcing_bidirectional \
		--names "start (causal demo model; 4 steps),self-forcing from the bidirectional teacher (4 steps)" \
		--out outputs/demo/self_forcing_bidirectional.md

# What a lent GPU machine needs to run tools/gpu_check.py (docs/gpu_check.md): the pure-Python wheels its bare
# image lacks, at the versions tested here, and the yardstick, which does not travel from ../shared.
GPU_WHEELS := $(shell grep -E '^(diffusers|webdataset|braceexpand)==' constraints.txt)
gpu-bundle: install
	rm -rf .gpu && mkdir -p .gpu/wheels
	cp ../shared/bench/yardstick.py .gpu/
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels $(GPU_WHEELS)

# The weighting ablation (configs/ablation.yaml; about 39 minutes on one CPU core): table and plots in
# outputs/ablation. Rerunning skips finished runs.
ablation: install outputs/ablation/data/val-000000.tar
	$(BIN)/dforce ablate configs/ablation.yaml --weightings independent,paths,teacher,sync,schedule:pyramid --seeds 3

outputs/ablation/data/val-000000.tar: | install
	$(BIN)/dforce make-synthetic --out outputs/ablation/data --clips 512 --frames 12 --size 16 --balls 2 --overwrite
	$(BIN)/dforce make-synthetic --out outputs/ablation/data --clips 16 --frames 64 --size 16 --balls 2 --seed 1 \
		--prefix val --overwrite

outputs/demo/run/model/noise.json: | install
	$(MAKE) demo

BALLS := --size 16 --balls 1  # the demo's data, simplified (docs/STUDY.md)

outputs/demo/balls/train-000003.tar: | install
	$(BIN)/dforce make-synthetic --out outputs/demo/balls --clips 1024 --frames 32 $(BALLS) --overwrite

outputs/demo/balls/val-000000.tar: | install
	$(BIN)/dforce make-synthetic --out outputs/demo/balls --clips 64 --frames 64 $(BALLS) --seed 1 --prefix val

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
