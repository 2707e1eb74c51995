#!/usr/bin/env bash
# Celery peer for `kiln bench pipeline`: sets up its venv, then runs the benchmark.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "${HERE}/setup.sh"
exec "${HOME}/.cache/kiln/venv-celery/bin/python" "${HERE}/bench.py" "$@"
