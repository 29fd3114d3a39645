# Two entry points: `make demo` (train the demo model on generated data, CPU, minutes)
# and `make test` (the test suite). Both create .venv with pip on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test venv lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev,geo,space,ray,tracking]"
	touch $@

demo: venv
	HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 \
		--mixed_precision no --dynamo_backend no scripts/train.py --config demo.yaml
	HF_HUB_OFFLINE=1 $(PY) scripts/demo_scene.py

test: venv
	HF_HUB_OFFLINE=1 HF_EVALUATE_OFFLINE=1 $(PY) -m pytest -n 2 --dist loadscope --durations=15 tests

# The CPU benchmarks of bench/README.md (about 40 minutes on 2 cores); `bash bench/gpu.sh` on a CUDA machine.
bench: venv
	$(PY) -m pip install --quiet -e ".[bench]"
	HF_HUB_OFFLINE=1 $(PY) bench/train_step.py --fast-peers --sizes 2x256 2x320 8x256
	HF_HUB_OFFLINE=1 $(PY) bench/inference.py
	HF_HUB_OFFLINE=1 $(PY) bench/stream_memory.py
	HF_HUB_OFFLINE=1 $(PY) bench/data_throughput.py
	HF_HUB_OFFLINE=1 $(PY) bench/metric_speed.py --threads 1
	HF_HUB_OFFLINE=1 $(PY) bench/predict_raster.py

lint: venv
	$(VENV)/bin/ruff check sidewalk_hf scripts tests bench space
	$(VENV)/bin/ruff format --check sidewalk_hf scripts tests bench space

clean:
	rm -rf $(VENV) runs data/synthetic .pytest_cache
