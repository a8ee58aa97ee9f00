#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine. Installs what the tests need first.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need: etcd, promtool, openssl, the Python test clients.
source scripts/test-deps.sh

cargo test --workspace --all-targets --locked "$@"
