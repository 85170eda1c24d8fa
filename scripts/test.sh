#!/usr/bin/env bash
# Set up (with the test extras) and run the whole test suite.
VLKIT_EXTRAS="[test]"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
.venv/bin/python -m pytest -q "$@"
