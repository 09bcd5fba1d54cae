#!/usr/bin/env bash
# Installs what NetProfiler needs on Debian 12 (as root): the Debian packages
# and a virtual environment in .venv with requirements.txt. Safe to re-run.
# EXTRA_APT names more Debian packages (scripts/test.sh adds the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES=(iptables libpcap-dev tcpdump iproute2 conntrack libnetfilter-queue-dev
              python3-venv python3-dev gcc curl util-linux ${EXTRA_APT:-})
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  # Packages such as prometheus would start their daemon on install: a test tool must not.
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  trap '[ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
