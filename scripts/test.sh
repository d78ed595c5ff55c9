#!/usr/bin/env bash
# Runs every test: unit, integration against real datanode processes, crash and full-disk tests
# (these mount a tmpfs, so run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# First: the chart tests also install helm into .tools/, which the Kubernetes tests use to render
# the chart's RBAC.
scripts/test-chart.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
# I/O fault injection (pwritev, fdatasync, index commit, segment creation): a feature no user build has.
cargo test -p cairn-datanode --features failpoints --test failpoints
