# Sourced by the set-up scripts: create .venv if missing and install vlkit into it.
# torch is pinned to 2.13.0 (on these machines pip takes the CPU build from local disk).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VENV_PY=.venv/bin/python
"$VENV_PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV_PY" -m pip install -q --disable-pip-version-check -e ".${VLKIT_EXTRAS:-}"
