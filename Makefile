# pg-ha-runbook. On a fresh Debian 12 machine, as root:  make demo  and  make test  (lab hosts: Debian 13, see hosts.yml)
SHELL := /bin/bash
PY    ?= /usr/bin/python3
VENV  := .venv
BIN   := $(VENV)/bin
INV   := $(BIN)/inv
APT_PACKAGES := debootstrap systemd-container iproute2 openssh-client python3-venv sqlite3 ca-certificates

.PHONY: deps venv demo test unit e2e soak bench lint clean-lab

deps:  ## Debian packages the lab and the bundle builder need (idempotent)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@# every lab host's systemd takes inotify instances; the default 128 runs out near 15 hosts
	@if [ "$$(cat /proc/sys/fs/inotify/max_user_instances)" -lt 1024 ]; then sysctl -q -w fs.inotify.max_user_instances=1024; fi

$(BIN)/inv: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/inv

demo: deps venv  ## build the lab and the offline bundle, bring the cluster up, show its status
	$(INV) lab.up
	$(INV) bundle.build
	$(INV) cluster.up --verify   # --verify: a re-run on re-created lab hosts redoes what is not there
	$(INV) cluster.status

# pytest exit code 5 = "no tests collected": that is a failure here, never a silent pass.
define pytest
	$(BIN)/pytest $(1); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests in $(1)"; exit 1; fi; exit $$rc
endef

unit: venv
	@$(call pytest,-q tests/unit)

e2e: deps venv
	@$(call pytest,-q -x tests/e2e)

test: deps venv  ## unit tests, then the end-to-end tests in the lab
	@$(call pytest,-q tests/unit)
	@$(call pytest,-q -x tests/e2e)

soak: deps venv  ## the long versions: kill -9 after every step, rollback every step; Debian 13 and Debian 12
	RUNBOOK_SOAK=1 $(BIN)/pytest -q tests/e2e
	RUNBOOK_SOAK=1 RUNBOOK_E2E_INVENTORY=tests/e2e/hosts-debian12.yml $(BIN)/pytest -q tests/e2e

bench: deps venv  ## benchmarks: they print figures, they assert nothing
	$(BIN)/pip install -q -e '.[test,bench]'
	@rc=0; for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || { echo "!! $$b failed"; rc=1; }; done; exit $$rc

lint: venv $(BIN)/mypy
	$(BIN)/ruff check runbook tests tasks.py bench
	$(BIN)/mypy  # files and settings: [tool.mypy] in pyproject.toml

$(BIN)/mypy: pyproject.toml  # a venv made before mypy joined the test extras gets it here
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

clean-lab: venv
	$(INV) lab.down
