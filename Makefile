# make demo   build the synthetic demo data, train a small UNITER with IAIS on it, evaluate
# make test   run the test suite (installs horovod once, so the horovodrun tests run too)
# make bench  data-loader, evaluation and training throughput against the plain path
#             (ORIGINAL=<checkout of lancopku/IAIS>: against the original code too)
#
# Everything runs in .venv. On a machine without an NVIDIA GPU the CPU build of torch is
# installed (no CUDA wheels); with a GPU, PyPI's CUDA build. Override with
# `make TORCH_SPEC=torch==X.Y.Z TORCH_INDEX=<index url> ...`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
TORCH_INDEX ?=
else
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
DEMO_DIR ?= demo
DEMO_OUT ?= $(DEMO_DIR)/output

.PHONY: demo test bench venv dev horovod clean-demo

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --retries 2 --timeout 30 \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

$(VENV)/.horovod: $(VENV)/.runtime scripts/install_horovod.sh
	bash scripts/install_horovod.sh $(PY)
	touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev
horovod: $(VENV)/.horovod

$(DEMO_DIR)/txt_db/itm_demo_test.db/meta.json: | $(VENV)/.runtime
	$(PY) scripts/make_demo_data.py --output $(DEMO_DIR)

demo: $(VENV)/.runtime $(DEMO_DIR)/txt_db/itm_demo_test.db/meta.json
	rm -rf $(DEMO_OUT)
	$(PY) train_itm_hard_negatives.py --config config/train-itm-demo.json --output_dir $(DEMO_OUT) --IAIS singular
	$(PY) inf_itm.py --txt_db $(DEMO_DIR)/txt_db/itm_demo_test.db --img_db $(DEMO_DIR)/img_db/demo \
		--checkpoint $$(ls -v $(DEMO_OUT)/ckpt/model_step_*.pt | tail -1) --model_config config/uniter-demo.json \
		--output_dir $(DEMO_OUT)/eval_test --batch_size 100 --n_workers 0

test: $(VENV)/.dev $(VENV)/.horovod
	$(PY) -m pytest -q tests

bench: $(VENV)/.dev
	$(PY) scripts/bench.py --output bench_out/bench.json $(if $(ORIGINAL),--original_repo $(ORIGINAL))

clean-demo:
	rm -rf $(DEMO_DIR)
