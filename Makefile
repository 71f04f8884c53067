# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.abdist-installed

.PHONY: demo test test-slow test-portable lint format clean-demo

# Re-install only when the project's metadata or the install script change.
$(STAMP): pyproject.toml Makefile docker/install.sh docker/constraints.txt
	bash docker/install.sh $(VENV) dev,ffcv,deepspeed
	touch $@

demo: $(STAMP)
	$(PY) -m abdist train configs/digits_lt/ce.yaml --out runs/demo/ce
	$(PY) -m abdist train configs/digits_lt/la.yaml --out runs/demo/la
	$(PY) -m abdist train configs/digits_lt/autobalance.yaml --out runs/demo/autobalance
	$(PY) -m abdist train configs/digits_lt/selmix.yaml --out runs/demo/selmix
	$(PY) -m abdist report runs/demo/ce runs/demo/la runs/demo/autobalance runs/demo/selmix \
		--out runs/demo/report

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The numerically sensitive tests under the CPU kernels and thread counts another machine may
# pick (CI runs on whatever x86_64 it gets): each setting must pass, not just this machine's.
PORTABLE_SETTINGS := ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	OMP_NUM_THREADS=1 OMP_NUM_THREADS=2
test-portable: $(STAMP)
	@set -e; for setting in $(PORTABLE_SETTINGS); do \
	  echo "== $$setting"; env $$setting $(PY) -m pytest -q -m 'numerics and not slow'; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf runs/demo
