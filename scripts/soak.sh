#!/usr/bin/env bash
# The long kill-and-resume soak: runs tests/soak.rs again and again, each round with a fresh
# seed for the kill moments and SOAK_KILLS kills per test, until SOAK_SECONDS have passed
# (default one hour). Stops at the first failure and prints the seed that reproduces it:
#   TOPCOAT_SOAK_SEED=<seed> TOPCOAT_SOAK_KILLS=<kills> cargo test --release --test soak
# Usage: bash scripts/soak.sh            (an hour, 100 kills per test and round)
#        SOAK_SECONDS=600 SOAK_KILLS=50 bash scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${SOAK_SECONDS:-3600}
kills=${SOAK_KILLS:-100}
cargo test --release --test soak --no-run
start=$SECONDS
round=0
while (( SECONDS - start < seconds )); do
  seed=$(( (RANDOM << 15 | RANDOM) + round ))
  round=$((round + 1))
  echo "round $round: seed $seed, $kills kills per test, $((SECONDS - start)) s of $seconds"
  if ! TOPCOAT_SOAK_SEED=$seed TOPCOAT_SOAK_KILLS=$kills \
      cargo test --release --test soak -q 2>&1 | tail -n 20; then
    echo "soak FAILED in round $round; reproduce with:" >&2
    echo "  TOPCOAT_SOAK_SEED=$seed TOPCOAT_SOAK_KILLS=$kills cargo test --release --test soak" >&2
    exit 1
  fi
done
echo "soak passed: $round rounds, $((round * kills * 2)) kills in $((SECONDS - start)) s"
