#!/usr/bin/env bash
# Set up (with the test extras), check the import contracts and run the whole test suite.
VLKIT_EXTRAS="[test]"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
.venv/bin/lint-imports --no-cache  # imports run one way (the contracts in pyproject.toml)
.venv/bin/python -m pytest -q "$@"
