#!/usr/bin/env bash
# The long soak: mixed load with faults against real processes (etcd, two sim workers, a
# router), the same scenario as the suite's 40 s `a_short_soak_...` test in tests/chaos.rs,
# for 30 minutes by default. Streaming clients (checked token for token), unary calls with
# deadlines and mixed priorities, cancelling and slow-reading clients run throughout, while
# in turn a worker is killed (-9) and restarted, a worker is restarted with SIGTERM, etcd is
# frozen (SIGSTOP) and etcd is killed. Router and worker resident memory is sampled after
# every fault; the run fails if the router grows by more than 50 MiB after the first round
# of faults, a worker passes 256 MiB, any client sees an error it should not, or anything is
# left queued, running or unread at the end.
# Usage: scripts/soak.sh [MINUTES]     (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-30}"
source scripts/test-deps.sh
cargo build --release --locked -p openinfer-cli
OPENINFER_SOAK_SECONDS=$((minutes * 60)) cargo test --release --locked -p openinfer-tests \
    --test chaos soak_of_mixed_load_with_faults -- --ignored --nocapture
