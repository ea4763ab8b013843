# Tandem: `make run` starts the services on this machine, `make test` runs the suite.
# Both install what they need first (into .venv, idempotent).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The CPU build of torch is used unless the environment already provides one.
TORCH_VERSION ?= 2.13.0
MODEL  ?= models/tandem-demo-code/target

.PHONY: install protos test test-unit lint run bench-engine bench-serve bench-spec bench-kv bench-quant bench-forward clean demo-model gpu-check certs

install: $(VENV)/.installed protos

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	touch $@

protos: $(VENV)/.installed
	$(PY) -m tools.gen_protos

test: install
	$(PY) -m pytest -q -x --durations=15 tests

test-unit: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

run: install
	$(PY) -m tools.run_local --model $(MODEL) $(ARGS)

bench-engine: install
	$(PY) -m tools.bench engine --model $(MODEL)

# On a CUDA machine, with its own torch, triton and transformers (no install, no network).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check $(ARGS)

bench-quant: install
	$(PY) -m tools.bench quant --model $(MODEL) --out docs/benchmarks/quant/quant.json --markdown docs/benchmarks/quant/quant.md

bench-serve: install
	$(PY) -m tools.bench serve --model $(MODEL) $(ARGS)

# speculation with / without, concurrency 1 and saturation, against Leviathan et al.'s formula
bench-spec: install
	$(PY) -m tools.bench spec --model $(MODEL)

# a CPU model forward of 1-8 rows: the small-row float32 linear kernel against torch's linear
bench-forward: install
	$(PY) -m tools.bench forward --model $(MODEL) --out-dir docs/benchmarks/forward

# KV transfer bandwidth (gRPC stream, torch.distributed) against memcpy on this host
bench-kv: install
	$(PY) -m tools.bench_kv

# A development CA, a certificate per service and an API key file in deploy/certs/ (git-ignored),
# for the compose deployment and TLS tests; see docs/security.md. `make run` stays plaintext.
certs: install
	$(PY) -m tools.certs --out deploy/certs

demo-model: install
	$(PY) -m tools.train_demo --out models/tandem-demo-code

clean:
	rm -rf $(VENV) shared/pb .pytest_cache .ruff_cache

# The whole stack under mixed load for SOAK_SECONDS while workers are killed and restarted
# (tools/soak.py); exits non-zero on a wrong output, a leaked KV block or a hung request.
SOAK_SECONDS ?= 600
.PHONY: soak
soak: install
	$(PY) -m tools.soak --duration $(SOAK_SECONDS)
