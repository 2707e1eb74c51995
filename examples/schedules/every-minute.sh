#!/usr/bin/env bash
# A schedule that runs a WebAssembly job every minute.
# Needs a running kiln (`kiln serve`) and `kiln` on PATH.
set -euo pipefail
cd "$(dirname "$0")"
module=$(kiln module push hello.wat)
kiln schedule create hello-every-minute --cron '* * * * *' \
    --job-kind wasm --job-spec "{\"module\": \"$module\"}"
echo "created; watch it with: kiln schedule get hello-every-minute"
