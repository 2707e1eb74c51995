#!/usr/bin/env bash
# Celery peer for kiln's RabbitMQ intake benchmark: sets up its venv, then runs bench_amqp.py.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "${HERE}/setup.sh"
exec "${HOME}/.cache/kiln/venv-celery/bin/python" "${HERE}/bench_amqp.py" "$@"
