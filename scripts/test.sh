#!/usr/bin/env bash
# Runs every test: unit, integration against real datanode processes, crash and full-disk tests
# (these mount a tmpfs, so run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
scripts/test-chart.sh
