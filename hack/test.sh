#!/usr/bin/env bash
# The one test command (README and CI). On a fresh machine it installs what is missing
# (Debian packages, a virtualenv with the Python deps, the control-plane binaries built
# from Go modules, cached under ~/.cache/maestro), then runs lint, types and every test.
# Extra arguments go to pytest, e.g. `hack/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash hack/install-deps.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
bash hack/control-plane.sh build

# One command a line: under `set -e` a failure on the left of `&&` would not stop the run.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"; .venv/bin/mypy
echo "== pytest"; exec .venv/bin/python -m pytest "$@"
