#!/usr/bin/env bash
# Set up (with the test extras), check the import contracts and run the whole test suite.
# The browser tests (vlkit serve's page, vlkit compare's report) drive Debian's `chromium`
# package: installed here with apt-get when it is missing (as root, or with sudo).
VLKIT_EXTRAS="[test]"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && [ -z "${CHROMIUM:-}" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; } ||
    echo "scripts/test.sh: could not install chromium; the browser tests will fail and say so" >&2
fi
.venv/bin/lint-imports --no-cache  # imports run one way (the contracts in pyproject.toml)
.venv/bin/python -m pytest -q "$@"
