# make demo   build the synthetic demo data, train a small UNITER with IAIS on it, evaluate
# make test   run the test suite (installs horovod once, so the horovodrun tests run too)
# make fuzz   the format fuzzer of tests/test_fuzz_formats.py with many more examples
#             (FUZZ_EXAMPLES per format, 1000: some 10 minutes on 2 cores; FUZZ_SEED, 0)
# make bench  data-loader, evaluation and training throughput against the plain path, and
#             UNITER-base's FLOP/s against this host's matmul rate
#             (ORIGINAL=<checkout of lancopku/IAIS>: against the original code too)
# make bench-threads  the demo's training time under OpenMP thread policies, on a quiet
#             machine and beside busy processes (some 20 minutes on 2 cores)
# make gpu-check  on a CUDA machine: the CUDA tests, UNITER-base rates and MFU, evaluation
#             projected to the test sets, the demo trained with --fp16 (GPU_CHECK_OUT=dir;
#             WHEELS=dir installs missing packages offline from wheels made by `make wheels`)
# make lock   refresh requirements.lock: the newest versions requirements*.txt allow, kept
#             only when the test suite passes with them
#
# Everything runs in .venv, installed from requirements.lock (the exact versions the tests
# passed with). torch comes first, at the lock's version: on a machine without an NVIDIA GPU
# its CPU build (no CUDA wheels), with a GPU PyPI's CUDA build. Override with
# `make TORCH_SPEC=torch==X.Y.Z TORCH_INDEX=<index url> ...`; newest versions instead of the
# lock: `make REQUIREMENTS=requirements.txt TORCH_SPEC=torch ...`.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
REQUIREMENTS ?= requirements.lock
TORCH_SPEC ?= $(shell grep -m1 '^torch==' requirements.lock)
LOCK_VENV ?= .venv-lock
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
TORCH_INDEX ?=
else
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
DEMO_DIR ?= demo
DEMO_OUT ?= $(DEMO_DIR)/output

.PHONY: demo relations test fuzz bench bench-threads gpu-check wheels venv dev horovod lock clean-demo

# torch is installed on its own (its build depends on the machine), the rest from $(REQUIREMENTS)
$(VENV)/.runtime: $(REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --retries 2 --timeout 30 \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	grep -v '^torch[=<>~ ]' $(REQUIREMENTS) > $(VENV)/requirements-without-torch.txt
	$(PIP) install -r $(VENV)/requirements-without-torch.txt
	touch $@

# `python scripts/x.py` imports the repository's packages (data, model, engine, utils, scripts): a .pth
# file in the venv's site-packages puts the repository root on its path. Nothing is built or
# downloaded for that, so it works offline. It is checked at every make: a venv that names
# another checkout (one moved, or a venv shared with another clone) would import that one's code.
$(VENV)/.repo-path: $(VENV)/.runtime FORCE
	@pth="$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/iais-repository.pth"; \
	if [ "$$(cat "$$pth" 2>/dev/null)" != "$(CURDIR)" ]; then echo "$(CURDIR)" > "$$pth" && echo "$$pth: $(CURDIR)"; fi
	@touch $@

FORCE:

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) install -r requirements-dev.txt
	touch $@

$(VENV)/.horovod: $(VENV)/.runtime scripts/install_horovod.sh
	bash scripts/install_horovod.sh $(PY)
	touch $@

venv: $(VENV)/.repo-path
dev: $(VENV)/.dev
horovod: $(VENV)/.horovod

# a fresh environment with the newest allowed versions runs the test suite; its versions
# (torch's without the build tag, horovod left to install_horovod.sh) become the lock
lock:
	rm -rf $(LOCK_VENV)
	$(MAKE) VENV=$(LOCK_VENV) REQUIREMENTS=requirements.txt TORCH_SPEC=torch test
	{ echo "# Exact versions the test suite passed with, on Python $$($(LOCK_VENV)/bin/python -V | cut -d' ' -f2);" \
	       "\`make lock\` refreshes this file."; \
	  echo "# \`make\` installs torch first at the version pinned here (the CPU build on a machine without"; \
	  echo "# an NVIDIA GPU, PyPI's CUDA build on one with a GPU; TORCH_INDEX picks another build), then"; \
	  echo "# the rest. horovod is built from source by scripts/install_horovod.sh."; \
	  $(LOCK_VENV)/bin/python -m pip freeze | grep -v -e '^horovod' -e '^pkg.resources' | sed 's/^\(torch==[^+]*\)+.*/\1/'; \
	} > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf $(LOCK_VENV)

# the demo's training config with its paths under DEMO_DIR, written by make_demo_data.py
$(DEMO_DIR)/train-itm-demo.json: | $(VENV)/.repo-path
	$(PY) scripts/make_demo_data.py --output $(DEMO_DIR)

demo: $(VENV)/.repo-path $(DEMO_DIR)/train-itm-demo.json
	rm -rf $(DEMO_OUT)
	$(PY) train_itm_hard_negatives.py --config $(DEMO_DIR)/train-itm-demo.json --output_dir $(DEMO_OUT) --IAIS singular
	$(PY) inf_itm.py --txt_db $(DEMO_DIR)/txt_db/itm_demo_test.db --img_db $(DEMO_DIR)/img_db/demo \
		--checkpoint $$(ls -v $(DEMO_OUT)/ckpt/model_step_*.pt | tail -1) --model_config config/uniter-demo.json \
		--output_dir $(DEMO_OUT)/eval_test --batch_size 100 --n_workers 0
	$(PY) scripts/retrieval_metrics.py $(DEMO_OUT)/eval_test/score_matrix.pt \
		--groups $(DEMO_DIR)/annotations/groups_test.json --output $(DEMO_OUT)/eval_test/metrics.json

# hours on 2 cores, at low priority; stopped, it continues where it stopped
relations: $(VENV)/.repo-path $(DEMO_DIR)/train-itm-demo.json
	nice -n 10 $(PY) scripts/demo_relations.py --demo $(DEMO_DIR) --output $(DEMO_DIR)/relations

test: $(VENV)/.dev $(VENV)/.horovod $(VENV)/.repo-path
	$(PY) -m pytest -q tests

FUZZ_EXAMPLES ?= 1000
FUZZ_SEED ?= 0
fuzz: $(VENV)/.dev $(VENV)/.repo-path
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_formats.py \
		--hypothesis-seed=$(FUZZ_SEED) --hypothesis-show-statistics

bench: $(VENV)/.dev $(VENV)/.repo-path
	$(PY) scripts/bench.py --output bench_out/bench.json $(if $(ORIGINAL),--original_repo $(ORIGINAL))

bench-threads: $(VENV)/.repo-path
	$(PY) scripts/bench_threads.py --output bench_out/threads.json

# The GPU check runs with .venv when there is one, else with python3 (e.g. the PyTorch of a
# CUDA image, which the check uses as it is); as a module, so that either finds the repository.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_OUT ?= gpu_check_out
gpu-check:
	$(GPU_PY) -m scripts.gpu_check --output $(GPU_CHECK_OUT) $(if $(WHEELS),--wheels $(WHEELS))

# Wheels of the packages a CUDA PyTorch image usually lacks, for an offline machine running
# Python $(WHEEL_PYTHON) on x86-64 Linux.
WHEELS ?=
WHEEL_DIR := $(or $(WHEELS),wheels)
WHEEL_PYTHON ?= 3.12
WHEEL_PACKAGES ?= lmdb lz4 msgpack
wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(WHEEL_DIR) $(WHEEL_PACKAGES)

clean-demo:
	rm -rf $(DEMO_DIR)
