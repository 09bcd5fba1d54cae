#!/usr/bin/env bash
# Sets everything up, then runs the service: scripts/run.sh [PORT] (default 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python main.py "${@:-8080}"
