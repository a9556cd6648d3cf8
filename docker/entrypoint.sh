#!/bin/sh
# Entrypoint of the edgestack Triton images. CI runs this same script outside Docker
# (tests/unit/test_deploy_files.py), so keep it POSIX sh and free of container-only paths.
#
# It `exec`s the server, so the server gets this PID (PID 1 in a container, or the child of
# `docker run --init` / compose `init: true`) and SIGTERM/SIGINT reach it directly.
#
# Settings, all from the environment:
#   EDGESTACK_SERVER    edgestack (default): `edgestack serve`, which starts the tritonserver of the
#                       nvidia-pytriton wheel, waits until it is ready and stops it on SIGTERM
#                       (CPU image). It listens on 127.0.0.1 only (edgestack.server.TritonServer).
#                       tritonserver: run a tritonserver binary directly with the same flags as
#                       edgestack.server (GPU image: the one in the official Triton image).
#   MODEL_REPOSITORY    the rendered repository (default /models)
#   HTTP_PORT           8000     GRPC_PORT 8001     METRICS_PORT 8002
#   TRITON_LOG          file the server log is appended to. Empty (default): `edgestack serve`
#                       discards it and tritonserver prints it on stdout; /dev/stdout: stdout for both.
#   MODEL_CONTROL_MODE  none (default) or explicit: every model is loaded at start and the repository
#                       load/unload API is open, so the sidecar can swap versions
#   tritonserver mode only:
#   BIND_ADDRESS        address of the HTTP and gRPC endpoints (default 0.0.0.0)
#   TRITONSERVER        the binary (default: tritonserver on PATH)
#   TRITON_BACKEND_DIR  --backend-directory (default: the binary's own, /opt/tritonserver/backends)
#   PYTHON_SHM_DEFAULT_BYTES / PYTHON_SHM_GROWTH_BYTES  Python-backend shared memory per model
#                       instance (default 33554432 / 16777216, as edgestack.server)
# Arguments given to the script are passed on to the server after these flags.
set -eu

EDGESTACK_SERVER=${EDGESTACK_SERVER:-edgestack}
MODEL_REPOSITORY=${MODEL_REPOSITORY:-/models}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
TRITON_LOG=${TRITON_LOG:-}
MODEL_CONTROL_MODE=${MODEL_CONTROL_MODE:-none}

die() {
    echo "entrypoint: $*" >&2
    exit 64
}

check_port() {
    case "$2" in
        '' | *[!0-9]*) die "$1 must be a port number, got '$2'" ;;
    esac
}

check_port HTTP_PORT "$HTTP_PORT"
check_port GRPC_PORT "$GRPC_PORT"
check_port METRICS_PORT "$METRICS_PORT"
case "$MODEL_CONTROL_MODE" in
    none | explicit) ;;
    *) die "MODEL_CONTROL_MODE must be 'none' or 'explicit', got '$MODEL_CONTROL_MODE'" ;;
esac
[ -d "$MODEL_REPOSITORY" ] || die "MODEL_REPOSITORY $MODEL_REPOSITORY is not a directory (render one with: edgestack build --out $MODEL_REPOSITORY)"

case "$EDGESTACK_SERVER" in
    edgestack)
        if [ -n "$TRITON_LOG" ]; then
            set -- --log "$TRITON_LOG" "$@"
        fi
        exec edgestack serve "$MODEL_REPOSITORY" \
            --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" \
            --model-control "$MODEL_CONTROL_MODE" "$@"
        ;;
    tritonserver)
        BIND_ADDRESS=${BIND_ADDRESS:-0.0.0.0}
        TRITONSERVER=${TRITONSERVER:-tritonserver}
        TRITON_BACKEND_DIR=${TRITON_BACKEND_DIR:-}
        PYTHON_SHM_DEFAULT_BYTES=${PYTHON_SHM_DEFAULT_BYTES:-33554432}
        PYTHON_SHM_GROWTH_BYTES=${PYTHON_SHM_GROWTH_BYTES:-16777216}
        # tritonserver logs to stdout by itself
        if [ -n "$TRITON_LOG" ] && [ "$TRITON_LOG" != /dev/stdout ]; then
            set -- --log-file="$TRITON_LOG" "$@"
        fi
        if [ -n "$TRITON_BACKEND_DIR" ]; then
            set -- --backend-directory="$TRITON_BACKEND_DIR" "$@"
        fi
        if [ "$MODEL_CONTROL_MODE" = explicit ]; then
            set -- --model-control-mode=explicit --load-model='*' "$@"
        fi
        # The flags of edgestack.server.TritonServer.command, listening on BIND_ADDRESS.
        exec "$TRITONSERVER" \
            --model-repository="$MODEL_REPOSITORY" \
            --http-port="$HTTP_PORT" \
            --grpc-port="$GRPC_PORT" \
            --metrics-port="$METRICS_PORT" \
            --http-address="$BIND_ADDRESS" \
            --grpc-address="$BIND_ADDRESS" \
            --allow-metrics=true \
            --metrics-config=summary_latencies=true \
            --exit-timeout-secs=10 \
            --log-info=true \
            --backend-config=python,shm-default-byte-size="$PYTHON_SHM_DEFAULT_BYTES" \
            --backend-config=python,shm-growth-byte-size="$PYTHON_SHM_GROWTH_BYTES" \
            "$@"
        ;;
    *)
        die "EDGESTACK_SERVER must be 'edgestack' or 'tritonserver', got '$EDGESTACK_SERVER'"
        ;;
esac
