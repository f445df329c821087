# localflow: `make demo` runs the Sophia flow on embedded services; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-system test-compose lint demo peers bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Tests run in TEST_WORKERS parallel workers, each with its own servers (they mostly wait on
# servers, so more workers than cores pays), a module per worker so module fixtures (a whole
# pipeline run) are built once; `make test TEST_WORKERS=0 PYTEST_ARGS="-k ..."` runs in-process.
TEST_WORKERS ?= 4
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Tests with real Debian programs (logrotate): installs the missing ones with apt-get first.
SYSTEM_PROGRAMS := logrotate
test-system: $(STAMP)
	@for p in $(SYSTEM_PROGRAMS); do command -v $$p >/dev/null 2>&1 || test -x /usr/sbin/$$p || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; \
	fi
	$(BIN)/python -m pytest -m system $(PYTEST_ARGS)

# The real docker-compose.yml on a private dockerd (tests/compose/engine.py; as root). Installs the
# Debian packages it needs when missing; images and the Debian base are cached in LOCALFLOW_CACHE_DIR.
COMPOSE_PACKAGES := dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap
test-compose: $(STAMP)
	@missing=""; for pair in $(COMPOSE_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; fi
	$(BIN)/python -m pytest -m compose tests/test_compose.py -s $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/localflow demo examples/sophia/flow.yaml $(DEMO_ARGS)

# The peers `make bench` compares localflow with, each in a venv of its own under bench/.venvs (their
# dependencies never touch ours); one that cannot install leaves its log there and its rows say why.
PEER_VENVS := bench/.venvs
PEER_PACKAGES := 'quixstreams:quixstreams[postgresql,redis,aws,s3]>=3.28' 'pathway:pathway>=0.33'
peers:
	@mkdir -p $(PEER_VENVS); for pair in $(PEER_PACKAGES); do name=$${pair%%:*}; spec=$${pair#*:}; \
	  dir=$(PEER_VENVS)/$$name; test "$$(cat $$dir/.installed 2>/dev/null)" = "$$spec" && continue; \
	  echo "installing $$spec into $$dir"; \
	  { test -x $$dir/bin/python || $(PYTHON) -m venv $$dir; } && $$dir/bin/python -m pip install -q "$$spec" \
	    > $(PEER_VENVS)/$$name-install.log 2>&1 && echo "$$spec" > $$dir/.installed \
	    || echo "$$name did not install (see $(PEER_VENVS)/$$name-install.log): its rows will say so"; done

bench: $(STAMP) peers
	$(BIN)/python -m bench $(BENCH_ARGS)

chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
