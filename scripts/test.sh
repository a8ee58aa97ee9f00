#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine. Installs what the tests need first.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Test-time tools are installed here as the suite grows (etcd, promtool, ...).

cargo test --workspace --all-targets --locked "$@"
