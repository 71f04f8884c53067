# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.abdist-installed

.PHONY: demo test test-slow lint format clean-demo

# Re-install only when the project's metadata or the install script change.
$(STAMP): pyproject.toml Makefile docker/install.sh docker/constraints.txt
	bash docker/install.sh $(VENV) dev,ffcv,deepspeed
	touch $@

demo: $(STAMP)
	$(PY) -m abdist train configs/digits_lt/ce.yaml --out runs/demo/ce
	$(PY) -m abdist train configs/digits_lt/la.yaml --out runs/demo/la
	$(PY) -m abdist train configs/digits_lt/autobalance.yaml --out runs/demo/autobalance
	$(PY) -m abdist report runs/demo/ce runs/demo/la runs/demo/autobalance --out runs/demo/report

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf runs/demo
