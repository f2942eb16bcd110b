#!/usr/bin/env bash
# Serve the models in serving/models.config over TF Serving's gRPC API on port 8500.
# Uses the real tensorflow_model_server when it is on PATH (monitoring and REST on 8501, batching
# when BATCHING=true, see serving/batching.config), else the lungtf dev server (same gRPC API, same
# config; no REST, no batching).
#   serving/run.sh [CONFIG]          CONFIG defaults to serving/models.config
# Environment: GRPC_PORT (8500), REST_PORT (8501), BATCHING (false), HOST (dev server bind
# address, 127.0.0.1), PYTHON (the interpreter with lungtf installed; .venv by default).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config="${1:-$here/models.config}"
grpc_port="${GRPC_PORT:-8500}"
if command -v tensorflow_model_server >/dev/null 2>&1; then
  exec tensorflow_model_server \
    --port="$grpc_port" \
    --rest_api_port="${REST_PORT:-8501}" \
    --model_config_file="$config" \
    --model_config_file_poll_wait_seconds=60 \
    --file_system_poll_wait_seconds=1 \
    --enable_batching="${BATCHING:-false}" \
    --batching_parameters_file="$here/batching.config" \
    --monitoring_config_file="$here/monitoring.config"
fi
python="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$python" ] || python=python3
echo "tensorflow_model_server not on PATH: starting the lungtf dev server" >&2
exec "$python" -m lungtf.serving serve --config "$config" \
  --host "${HOST:-127.0.0.1}" --port "$grpc_port" --poll-seconds 1
