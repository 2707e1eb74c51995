#!/usr/bin/env bash
# Builds the digest steps (one WebAssembly module), pushes it, applies the
# pipeline and runs it over corpus.tar, then fetches the artifacts.
# Needs a running kiln (`kiln serve`) and `kiln` on PATH; the wasm32-wasip1
# Rust target is added with rustup when missing.
# Extra arguments go to `kiln pipeline run`, e.g. --param max_warnings=0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="${CARGO_TARGET_DIR:-$here/modules/target}"
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
    rustup target add wasm32-wasip1 >&2
fi
cargo build --quiet --release --target wasm32-wasip1 \
    --manifest-path "$here/modules/Cargo.toml" --target-dir "$target" >&2
module=$(kiln module push "$target/wasm32-wasip1/release/digest.wasm")
kiln pipeline apply -f "$here/digest.yaml" >&2
status=0
kiln pipeline run source-digest --wait \
    --param module="$module" --param tarball="$(base64 -w0 "$here/corpus.tar")" "$@" \
    | tee "${TMPDIR:-/tmp}/kiln-digest-run.txt" || status=$?
run=$(awk '/^run [0-9]+ /{id=$2} END{print id}' "${TMPDIR:-/tmp}/kiln-digest-run.txt")
if [ -n "$run" ]; then
    echo "--- artifacts of run $run"
    kiln run artifacts "$run"
    if [ "$status" -eq 0 ]; then
        echo "--- register/digest.json"
        kiln run artifacts "$run" register/digest.json
        echo
    fi
fi
exit "$status"
