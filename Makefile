# credbroker's two commands: `make demo` and `make test`. Both work on a fresh
# Debian machine with Rust and Go: `make setup` installs everything else.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
# The environment the tests need (KUBEBUILDER_ASSETS, CREDBROKER_BAO): the
# last line hack/setup.sh prints. Its progress goes to stderr.
WITH_TEST_ENV = eval "$$(hack/setup.sh | tail -n1)"

.PHONY: test setup lint fmt crds crds-check build-tests demo

## test: install what the tests need, lint, then run every test, including
## the ones marked #[ignore = "needs ..."] that use real parts (needs root).
test:
	@start=$$SECONDS; hack/setup.sh >/dev/null; setup=$$((SECONDS - start)); \
	start=$$SECONDS; $(MAKE) --no-print-directory lint build-tests; build=$$((SECONDS - start)); \
	start=$$SECONDS; $(WITH_TEST_ENV) 2>/dev/null; \
	$(CARGO) test --workspace --all-targets -- --include-ignored; tests=$$((SECONDS - start)); \
	echo "make test: setup $${setup}s, lint and build $${build}s, tests $${tests}s"

## setup: install Debian packages, OpenBao and the Kubernetes test binaries.
setup:
	@hack/setup.sh >/dev/null

lint: crds-check
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build-tests:
	$(CARGO) test --workspace --all-targets --locked --no-run

fmt:
	$(CARGO) fmt --all

## crds: regenerate crds/generated/*.yaml from the Rust types.
crds:
	$(CARGO) run -q -p credbroker-crds --bin crdgen

crds-check:
	$(CARGO) run -q --locked -p credbroker-crds --bin crdgen -- --check

## demo: the five-step journey through Vault and the broker (issue 4).
demo:
	@echo "make demo: the demo arrives with the sidecar and Vault source; it is not built yet." >&2; exit 1
