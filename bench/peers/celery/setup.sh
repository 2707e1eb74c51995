#!/usr/bin/env bash
# Creates the Celery peer's venv once and reuses it while its pins match.
set -euo pipefail

VENV="${HOME}/.cache/kiln/venv-celery"
PY="${PYTHON:-python3.11}"
PINS=("celery[redis]==5.7.0" "redis==8.1.0")
STAMP="${VENV}/.kiln-pins"
WANT="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') ${PINS[*]}"

if [[ -x "${VENV}/bin/python" && -f "${STAMP}" && "$(cat "${STAMP}")" == "${WANT}" ]] \
  && "${VENV}/bin/python" -c 'import celery, redis' 2>/dev/null; then
  exit 0
fi

rm -rf "${VENV}"
mkdir -p "$(dirname "${VENV}")"
"$PY" -m venv "${VENV}"
# PyPI only: local wheel directories configured through the environment are ignored.
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL \
  "${VENV}/bin/pip" install --quiet --index-url https://pypi.org/simple "${PINS[@]}"
echo "${WANT}" > "${STAMP}"
