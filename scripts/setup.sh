#!/usr/bin/env bash
# Create .venv and install dwconvert with the extras named in $1 (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"

# A first install brings torch (a CUDA build of about 5.5 GB where pip takes that one):
# say so before pip fails halfway with "No space left on device".
need_gb=8
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch" 2>/dev/null; then
    for dir in . "${TMPDIR:-/tmp}"; do
        if [ ! -d "$dir" ]; then
            echo "setup: TMPDIR $dir is not a folder: point it at one, or unset it" >&2
            exit 1
        fi
        free_kb=$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 {print $4}') || true
        if ! [[ "$free_kb" =~ ^[0-9]+$ ]]; then
            echo "setup: cannot read the free space in $dir; going on without checking" >&2
            continue
        fi
        free_gb=$(( free_kb / 1024 / 1024 ))
        if [ "$free_gb" -lt "$need_gb" ]; then
            echo "setup: $free_gb GB free in $(cd "$dir" && pwd); installing torch and the" \
                 "other packages needs about $need_gb GB: free some space, or point TMPDIR" \
                 "at a larger disk" >&2
            exit 1
        fi
    done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
