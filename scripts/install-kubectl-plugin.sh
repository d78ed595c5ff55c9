#!/usr/bin/env bash
# Builds the `cairn` command and installs it twice: as `cairn`, and as `kubectl-cairn`, which
# kubectl runs for `kubectl cairn …` when it is on PATH. Usage: scripts/install-kubectl-plugin.sh [BINDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bindir="${1:-$HOME/.local/bin}"
cargo build --release -p cairn-operator --bin cairn
install -d "$bindir"
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/cairn" "$bindir/cairn"
ln -sf cairn "$bindir/kubectl-cairn"
echo "installed $bindir/cairn and $bindir/kubectl-cairn"
case ":$PATH:" in
  *":$bindir:"*) echo "try: kubectl cairn status -n NAMESPACE" ;;
  *) echo "add $bindir to PATH, then: kubectl cairn status -n NAMESPACE" ;;
esac
