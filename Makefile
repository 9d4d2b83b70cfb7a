# The two commands a user needs: `make demo` (the main job) and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.megamod-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-compat.txt setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps --upgrade --target $(VENV)/compat-tf4 -r requirements-compat.txt
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: setup
	$(VPY) -m pytest tests -q

demo: setup
	$(VPY) -m megamod demo --out runs/demo

clean:
	rm -rf build megamod/_C*.so runs
