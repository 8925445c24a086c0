# Entry points for people and CI. `make example` and `make test` are the two
# commands the README gives.

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup build example example-clean test bench diagrams lint clean-test-resources fuzz soak

# Installs Compose v2, the registry, sshd, graphviz, busybox-static and the
# cross linkers (Debian 12), and cargo-nextest when it is missing. Safe to
# run again.
setup:
	$(SUDO) scripts/setup-host.sh
	@command -v cargo-nextest >/dev/null 2>&1 || $(CARGO) install --locked cargo-nextest

build:
	$(CARGO) build

# Sets up the bundled example and runs the agent against it.
example: setup
	example/run.sh

example-clean:
	example/run.sh --clean

# Runs every test against the real Docker engine, registry and git server.
# Failpoints are compiled in so the power-cut tests can stop the agent at a
# given state; the release binary, built without them, is tested to ignore
# AUTOUPDATE_FAILPOINT. The self-update tests' agent image (a static build
# in a FROM scratch image) is built first, so no test waits for it.
test: setup
	scripts/clean-test-resources.sh
	$(CARGO) build --release --bin autoupdate
	scripts/self-update-test-image.sh >/dev/null
	$(CARGO) nextest run --features failpoints --profile ci
	scripts/clean-test-resources.sh

# Measures memory, binary sizes, poll cost, update time, the journal and the
# handover, and prints them against their targets. Takes about 25 minutes:
# BENCH_RSS_MINUTES (10) is the longest part. See docs/benchmarks.md.
bench: setup
	bench/run.sh

# Regenerates the DOT diagrams from the transition lists and renders them.
diagrams:
	UPDATE_DIAGRAMS=1 $(CARGO) test --test diagrams
	for dot in state-diagrams/*.dot; do dot -Tsvg "$$dot" -o "$${dot%.dot}.svg"; done

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --features failpoints -- -D warnings

# Removes the containers, networks, volumes and images that tests label.
clean-test-resources:
	scripts/clean-test-resources.sh

# Runs each fuzz target for FUZZ_SECONDS, one after the other, with cargo-fuzz
# (`cargo install cargo-fuzz`) on a nightly toolchain. New inputs go to
# fuzz/corpus/TARGET, crashes to fuzz/artifacts/TARGET. The limits make an
# allocation above FUZZ_MALLOC_MB, a process above FUZZ_RSS_MB or an input
# slower than FUZZ_TIMEOUT seconds a failure instead of passing silently.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= journal_reader handover_request config_parser
FUZZ_TOOLCHAIN ?= nightly
FUZZ_RSS_MB ?= 2048
FUZZ_MALLOC_MB ?= 512
FUZZ_TIMEOUT ?= 30

fuzz:
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$target && \
		nice -n 10 $(CARGO) +$(FUZZ_TOOLCHAIN) fuzz run $$target corpus/$$target seeds/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=$(FUZZ_RSS_MB) \
			-malloc_limit_mb=$(FUZZ_MALLOC_MB) -timeout=$(FUZZ_TIMEOUT) -print_final_stats=1 \
			|| exit 1; \
	done

# Runs SOAK_UPDATES stack updates with random faults (registry stopped,
# broken image, agent killed) against one agent, and prints failures, leaks
# and the agent's RSS. Not part of `make test`. The test removes its own
# Compose project and images, so other runs on the engine keep theirs.
SOAK_UPDATES ?= 200
SOAK_SEED ?= 1592532006

soak: setup
	SOAK_UPDATES=$(SOAK_UPDATES) SOAK_SEED=$(SOAK_SEED) nice -n 10 $(CARGO) test --features failpoints --test soak -- --ignored --nocapture
