#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (as root: the end-to-end
# tests build network namespaces and install real netfilter rules in them).
set -euo pipefail
cd "$(dirname "$0")/.."
# Test tools: tcpdump is the ground truth, prometheus scrapes /metrics, ping and
# setpriv drive the namespaces and the non-root checks.
EXTRA_APT="prometheus iputils-ping" bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
