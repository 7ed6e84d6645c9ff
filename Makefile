# credbroker's two commands: `make demo` and `make test`. Both work on a fresh
# Debian machine with Rust and Go: `make setup` installs everything else.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# The environment the tests need (KUBEBUILDER_ASSETS, CREDBROKER_BAO,
# CREDBROKER_CARGO_FUZZ, CREDBROKER_HELM, CREDBROKER_KUBECONFORM), as written
# by hack/setup.sh (its progress goes to stderr).
TEST_ENV := target/credbroker-test.env
# Seconds per fuzz target: a smoke run in `make test`, longer in `make fuzz`.
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_SECONDS ?= 60

.PHONY: test setup lint fmt crds build-tests demo fuzz chart

## test: install what the tests need, lint, build, then run every test,
## including the ones marked #[ignore = "needs ..."] that use real parts
## (network namespaces need root).
test: setup lint build-tests
	@set -a; source $(TEST_ENV); set +a; \
	start=$$SECONDS; \
	$(CARGO) test --workspace --all-targets --locked -- --include-ignored; \
	$(CARGO) test --workspace --doc --locked; \
	echo "make test: the tests took $$((SECONDS - start))s"; \
	start=$$SECONDS; hack/fuzz.sh $(FUZZ_SMOKE_SECONDS); \
	echo "make test: the fuzz smoke run took $$((SECONDS - start))s"

## setup: install Debian packages, OpenBao and the Kubernetes test binaries,
## and write $(TEST_ENV).
setup:
	@mkdir -p target; start=$$SECONDS; \
	hack/setup.sh > $(TEST_ENV).tmp; mv $(TEST_ENV).tmp $(TEST_ENV); \
	echo "make test: setup took $$((SECONDS - start))s"

lint:
	shellcheck -x kind-e2e/run.sh demo/run.sh hack/*.sh
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build-tests:
	@start=$$SECONDS; \
	$(CARGO) test --workspace --all-targets --locked --no-run; \
	echo "make test: the test build took $$((SECONDS - start))s"

fmt:
	$(CARGO) fmt --all

## fuzz: every fuzz target for FUZZ_SECONDS seconds each (cargo fuzz).
fuzz: setup
	@set -a; source $(TEST_ENV); set +a; hack/fuzz.sh $(FUZZ_SECONDS)

## chart: only the Helm chart's tests (e2e/tests/chart.rs: helm lint, the
## values schema, kubeconform, the API server's dry run, drift against
## webhook/deploy and controller/deploy); `make test` runs them too.
chart: setup
	$(CARGO) build --locked -p credbroker-controller -p credbroker-webhook -p credbroker-sidecar
	@set -a; source $(TEST_ENV); set +a; \
	$(CARGO) test --locked -p credbroker-e2e --test chart -- --include-ignored

## crds: regenerate crds/generated/*.yaml from the Rust types, and the
## chart's copy (charts/credbroker/crds, which a test holds byte-identical).
crds:
	$(CARGO) run -q -p credbroker-crds --bin crdgen
	cp crds/generated/*.yaml charts/credbroker/crds/

## demo: the five-step journey through Vault (OpenBao) and the broker,
## without Kubernetes (demo/run.sh, on loopback; it cleans up after itself).
demo:
	@mkdir -p target; hack/setup.sh --demo > target/credbroker-demo.env.tmp; \
	mv target/credbroker-demo.env.tmp target/credbroker-demo.env
	$(CARGO) build --locked -p credbroker-sidecar -p credbroker-demo
	@set -a; source target/credbroker-demo.env; set +a; demo/run.sh
