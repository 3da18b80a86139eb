# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU everywhere by default; on a GPU machine unset DS_ACCELERATOR.
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo demo-albef demo-finetune demo-finetune-albef test test-fast install test-services clean

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo_data/train/manifest.json: | $(STAMP)
	$(VENV)/bin/vlpt demo-data --out demo_data

demo: $(STAMP) demo_data/train/manifest.json
	$(VENV)/bin/vlpt pretrain --config configs/pretrain/demo.yaml

# The demo downstream tasks (same scenes) and the `make demo` checkpoint they start from.
demo_data/tasks/vcr/val/manifest.json: | $(STAMP) demo_data/train/manifest.json
	$(VENV)/bin/vlpt demo-data --out demo_data --tasks

runs/demo/checkpoints/latest: | $(STAMP) demo_data/train/manifest.json
	$(VENV)/bin/vlpt pretrain --config configs/pretrain/demo.yaml

demo-finetune: $(STAMP) runs/demo/checkpoints/latest demo_data/tasks/vcr/val/manifest.json
	$(VENV)/bin/vlpt demo-finetune

demo_pixels/train/manifest.json: | $(STAMP)
	$(VENV)/bin/vlpt demo-data --pixels

# The demo's stand-in for ALBEF's DeiT: a ViT trained on pictures of other scenes (docs/models.md).
runs/demo-vit/config.json: | $(STAMP)
	$(VENV)/bin/vlpt demo-vit

demo-albef: $(STAMP) demo_pixels/train/manifest.json runs/demo-vit/config.json
	$(VENV)/bin/vlpt pretrain --config configs/pretrain/demo-albef.yaml

# ALBEF retrieval, VE, NLVR2, VQA and grounding fine-tuned from the `make demo-albef` checkpoint and from scratch
# (docs/downstream.md); the task folders are the region demo's, joined to the pixel demo's pictures of the same scenes.
runs/demo-albef/checkpoints/latest: | $(STAMP) demo_pixels/train/manifest.json runs/demo-vit/config.json
	$(VENV)/bin/vlpt pretrain --config configs/pretrain/demo-albef.yaml

demo-finetune-albef: $(STAMP) runs/demo-albef/checkpoints/latest demo_data/tasks/vcr/val/manifest.json
	$(VENV)/bin/vlpt demo-finetune --family albef

# Best effort (root + apt-get): Slurm and munge for the Slurm job test, which skips without them.
test-services:
	@sh .ci/install_test_services.sh

# Two workers (pytest-xdist), each test file whole on one of them so its module fixtures are built once.
TEST_WORKERS ?= 2
test: $(STAMP) test-services
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs demo_data demo_pixels .pytest_cache
