# Nestbox — the two commands a fresh machine needs:
#   make up     run the platform on this machine (control plane + host agent, embedded SQLite)
#   make test   run the whole test suite (unit, integration on SQLite and PostgreSQL, real-VM end to end)

SHELL := /bin/bash
CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
TARGET := x86_64-unknown-linux-gnu
GUEST_BIN := target/$(TARGET)/guest/nestbox-guest
TEST_IMAGES := $(CURDIR)/target/nestbox-images
DATA_DIR ?= /var/lib/nestbox

.PHONY: up test check guest images test-images sdk-deps tool-deps code-interpreter-wheels openapi bench bench-builds bench-fleet deps fmt clean-test-state web web-deps deps-test bench-web

## System packages the platform needs (Debian/Ubuntu); `deps-test` adds the test suite's.
deps:
	$(SUDO) ./scripts/install-deps.sh

deps-test:
	$(SUDO) ./scripts/install-deps.sh --test

## The static guest agent baked into every VM image.
guest:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --locked --profile guest -p nestbox-guest --target $(TARGET)

## The web dashboard (web/, pinned by its lockfile): built into web/build, which the
## `nestbox` binary embeds when it is compiled afterwards.
web-deps:
	npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error

web: web-deps
	npm run build --prefix web

## Run the platform: builds, then starts `nestbox up` (guest images are built on first run).
up: deps guest web
	$(CARGO) build --locked --release -p nestbox-cli
	$(SUDO) NESTBOX_GUEST_BIN=$(CURDIR)/$(GUEST_BIN) ./target/release/nestbox up --data-dir $(DATA_DIR)

## Guest images for the tests (cached by content: instant when up to date).
test-images: guest
	$(CARGO) build --locked -p nestbox-cli
	./target/debug/nestbox image build --out $(TEST_IMAGES) --cache $(CURDIR)/target/nestbox-image-cache --guest-bin $(GUEST_BIN) --templates minimal,python,node

## E2B's stock SDKs (pinned) for the compatibility suites: a virtualenv and node_modules.
SDK_VENV := $(CURDIR)/target/sdk-venv
sdk-deps:
	[ -x $(SDK_VENV)/bin/pip ] || python3 -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/pip install --quiet --disable-pip-version-check -r sdk-tests/python/requirements.txt
	npm ci --prefix sdk-tests/js --no-audit --no-fund --loglevel=error

## Test tools from PyPI (pinned): schemathesis, run over the whole OpenAPI document.
TOOLS_VENV := $(CURDIR)/target/tools-venv
tool-deps:
	[ -x $(TOOLS_VENV)/bin/pip ] || python3 -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements-tools.txt

## The code-interpreter template's Python wheels (its pinned requirements, from PyPI), which
## its end-to-end test serves to the template's build from a package host.
CI_WHEELS := $(CURDIR)/target/code-interpreter-wheels
code-interpreter-wheels: sdk-deps
	$(SDK_VENV)/bin/pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps -r templates/code-interpreter/requirements.txt -d $(CI_WHEELS)

## The whole test suite. Needs root (namespaces, TAP, nftables, VMs), like the host agent.
## It ends by checking that the machine holds nothing of Nestbox's that it did not hold
## before (namespaces, links, slots, firewall tables, cgroups, guest memory, VMMs).
test: deps-test web test-images sdk-deps tool-deps code-interpreter-wheels
	./scripts/host-footprint.sh | sort > target/host-before.txt
	NESTBOX_TEST_IMAGES=$(TEST_IMAGES) NESTBOX_GUEST_BIN=$(CURDIR)/$(GUEST_BIN) NESTBOX_SDK_VENV=$(SDK_VENV) NESTBOX_TOOLS_VENV=$(TOOLS_VENV) NESTBOX_CODE_INTERPRETER_WHEELS=$(CI_WHEELS) $(CARGO) nextest run --locked --workspace --no-fail-fast
	./scripts/host-footprint.sh | sort > target/host-after.txt
	@left=$$(comm -13 target/host-before.txt target/host-after.txt); \
	if [ -n "$$left" ]; then echo "the test suite left behind:"; echo "$$left"; exit 1; fi; \
	echo "the test suite left nothing behind on this machine"

## Formatting and lints, as CI runs them.
check: web-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	npm run check --prefix web

fmt:
	$(CARGO) fmt --all

## Regenerate the checked-in OpenAPI document.
openapi:
	UPDATE_OPENAPI=1 $(CARGO) nextest run -p nestbox-control --test openapi

## Benchmarks on this machine (real VMs); prints medians.
bench: test-images sdk-deps
	$(CARGO) build --locked --release -p nestbox-cli
	$(SUDO) NESTBOX_GUEST_BIN=$(CURDIR)/$(GUEST_BIN) NESTBOX_BENCH_PYTHON=$(SDK_VENV)/bin/python ./target/release/nestbox bench --images-dir $(TEST_IMAGES)

## Template builds: a recipe built from scratch against a rebuild with its last step changed.
bench-builds: test-images
	$(CARGO) build --locked --release -p nestbox-cli
	$(SUDO) NESTBOX_GUEST_BIN=$(CURDIR)/$(GUEST_BIN) ./target/release/nestbox bench --only-builds --images-dir $(TEST_IMAGES)

## The dashboard's benchmark: the sandboxes page with 500 sandboxes (API answered by fixtures).
bench-web: web deps-test
	npm run bench --prefix web

## The fleet benchmark: a control plane on PostgreSQL, 1,000 simulated hosts, 10,000 creates.
bench-fleet:
	$(CARGO) bench --locked -p nestbox-cli --bench fleet
