# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
# TORCH_SPEC is installed first and explicitly: an unpinned torch pulls gigabytes of CUDA.
# Override it for other machines, e.g. `make test TORCH_SPEC="torch==2.5.1 --index-url ..."`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check -q
STAMP      := $(VENV)/.installed
PYTEST_ARGS ?= --durations=25
# Test files run in parallel, one worker per core (pytest-xdist; each file's tests stay on one
# worker, so module fixtures are built once). `make test XDIST=` runs them in one process.
XDIST      ?= -n auto --dist loadfile

.PHONY: install demo test test-fast test-timeline bench device-check clean help FORCE

help:
	@echo "make demo     digits end to end: train, deep-compress, export ONNX/TFLite fp32+int8, verify, gate"
	@echo "make test     run the test suite (5-6 min on 2 Intel Xeon cores, 6-8 on 2 Zen 5 cores, 11-15 on 2 Zen 3 cores)"
	@echo "make test-fast the test suite without the tests marked slow"
	@echo "make test-timeline  the test suite, then where its time went per worker and per file"
	@echo "make bench    run the benchmarks and rewrite docs/BENCHMARKS.md (long)"
	@echo "make device-check [FILES=...] [DEVICE_CPU=pi4|pi5|x86-avx2]  run exports on an emulated Raspberry Pi 4/5 (arm64 chroot, root)"
	@echo "               or x86 CPU without VNNI (qemu-x86_64 -cpu Haswell, no root) and compare with this host"
	@echo "tools/with-avx2-cpuid.sh CMD...  run CMD natively with an AVX2-only x86's CPUID, to time that CPU's int8"
	@echo "               kernels on this one (e.g. .venv/bin/edgesqueeze bench FILES, or make test / make demo;"
	@echo "               Linux x86-64, CPUID faulting)"
	@echo "make install  create $(VENV) and install edgesqueeze with its dependencies (INSTALLER=uv or pip)"
	@echo "make clean    remove $(VENV), .pytest_cache, .hypothesis, build and *.egg-info"

# The torch spec the venv was built with: a different TORCH_SPEC reinstalls (it was ignored
# once .venv existed, the stamp depending on pyproject.toml alone).
SPEC_FILE  := $(VENV)/.torch-spec
# A venv whose python no longer runs (moved, or its base interpreter upgraded away) is rebuilt:
# the stamp alone said it was installed, and every target failed with "python: not found".
$(SPEC_FILE): FORCE
	@if [ -e $(PY) ] || [ -L $(PY) ] || [ -e $(STAMP) ]; then $(PY) -c '' 2>/dev/null || { \
	  echo "note: $(VENV)'s python does not run (missing, moved, or its base Python removed): rebuilding $(VENV)"; \
	  rm -rf $(VENV); }; fi
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@
FORCE:

# pip installs without compiling bytecode (--no-compile): it compiled every module of every
# package, torch, jax and transformers whole, where edgesqueeze imports a small part of them
# (`make install` on a 2-core Zen 3: 135-148 s with it, 87-88 s without). tools/warm_bytecode.py
# then compiles the modules it does import, once (17 s in two processes); anything else compiles on first
# import. The install checks, `make demo` and `make test` write bytecode (WRITE_BYTECODE) even
# where PYTHONDONTWRITEBYTECODE is set, so each later process reads it compiled.
WRITE_BYTECODE := PYTHONDONTWRITEBYTECODE=

# edgesqueeze and its ~100 dependencies (litert-torch alone brings jax and transformers), once
# torch is in. INSTALLER=uv (the default) installs uv with pip, then `uv pip install`: it
# resolves and installs them in 5-6 s where pip took 48 s (of which 37 s resolving: pip reads
# and checks ~95,000 file links of ~120 PyPI projects one by one; 2-core Zen 3). torch stays
# the one pip installed from TORCH_SPEC: it is pinned to that version for uv, which reads
# neither pip's configuration nor its constraint files. uv finds packages on PyPI (or where
# UV_INDEX_URL / UV_DEFAULT_INDEX point); where it cannot install them (only pip's
# configuration names your index) this falls back to pip, or set INSTALLER=pip.
INSTALLER  ?= uv
TORCH_PIN  := $(VENV)/.torch-pin.txt

# pip's own exit status decides (an older torch still importing hid a TORCH_SPEC that failed)
$(STAMP): pyproject.toml $(SPEC_FILE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(TORCH_SPEC) and edgesqueeze into $(VENV) ..."
	@$(PIP) install --no-compile $(TORCH_SPEC) > $(VENV)/.pip.log 2>&1; rc=$$?; \
	  grep -v "is ignored: it is neither" $(VENV)/.pip.log; \
	  test $$rc = 0 || { echo "error: pip could not install $(TORCH_SPEC) (above); set TORCH_SPEC"; \
	                     rm -f $(SPEC_FILE); exit 2; }
	@$(WRITE_BYTECODE) $(PY) -W ignore -c "import torch" || { echo "error: $(TORCH_SPEC) did not install; set TORCH_SPEC"; exit 2; }
	@if [ "$(INSTALLER)" = uv ]; then \
	  $(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(TORCH_PIN); \
	  if ! $(PIP) install --no-compile uv > $(VENV)/.pip-uv.log 2>&1; then \
	    grep -v "is ignored: it is neither" $(VENV)/.pip-uv.log; \
	    echo "note: pip could not install uv (above); installing the dependencies with pip"; \
	  elif UV_LINK_MODE=copy $(VENV)/bin/uv pip install -q --python $(PY) -c $(TORCH_PIN) -e ".[dev]"; then \
	    exit 0; \
	  else echo "note: uv could not install the dependencies (above); installing them with pip"; fi; fi; \
	$(PIP) install --no-compile -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(WRITE_BYTECODE) $(PY) -c "import edgesqueeze.cli, pytest, hypothesis, xdist" || { echo "error: installing edgesqueeze failed"; exit 2; }
	@echo "compiling the bytecode of the modules edgesqueeze imports ..."
	@$(PY) tools/warm_bytecode.py > /dev/null 2>&1
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(WRITE_BYTECODE) OUT=artifacts/squeezenet-digits EDGESQUEEZE=$(VENV)/bin/edgesqueeze \
	  bash examples/ci/gate.sh
	@echo "demo outputs: $(CURDIR)/artifacts/squeezenet-digits/ (model.pt, curves.png; compressed/: model.esq," \
	      "report.md; export/: 8 files, .onnx and .tflite, fp32 and int8, each also packed as .esq;" \
	      "verify.json, verify.md + plots; gate.json, gate.md, gate.xml)"

# Bytecode is cached (git-ignored __pycache__ folders) even where PYTHONDONTWRITEBYTECODE is
# set: the suite starts about 100 Python processes, and each compiled edgesqueeze anew (0.15 s),
# as each worker did every test file when it collected them (about 8 s of its 21 s).
# OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep instead of spinning while they wait.
# The workers and their subprocesses share the cores, and a test on 2 threads took 29 s
# beside another 2-thread process where it takes 11 s alone (17 s with both passive).
TEST_ENV   := $(WRITE_BYTECODE) OMP_WAIT_POLICY=$(or $(OMP_WAIT_POLICY),PASSIVE)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# The suite with tools/suite_timeline.py: a table of where the time went (per worker, per file;
# in-process CPU, time waiting on subprocesses and their CPU; the CPUs busy on average), for a
# machine where make test is slow.
test-timeline: $(STAMP)
	$(TEST_ENV) PYTHONPATH=tools$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m pytest $(XDIST) -p suite_timeline $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Not part of `test`: needs root, qemu-user-static + mmdebstrap, and builds an arm64 chroot once
# (~/.cache/edgesqueeze/bookworm-arm64). FILES defaults to the demo's exports (run `make demo` first).
device-check: $(STAMP)
	PYTHON=$(PY) DEVICE_CPU=$(or $(DEVICE_CPU),pi4) bash tools/device-check.sh $(FILES)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
