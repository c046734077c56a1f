#!/usr/bin/env bash
# Distributed fine-tuning with torchrun: the MNIST CNN of digit-recognizer-py is converted
# to an eighth of its conv MACs with dw-pw (rank 1 per channel, the form that loses most),
# then fine-tuned by distillation from the original in NPROC processes (gloo on CPU, nccl
# on GPUs), on mnist5k images 0..3999, and measured on images 4000..4999.
#
#   bash scripts/setup.sh examples && bash examples/distributed_finetune.sh
#   NPROC=4 bash examples/distributed_finetune.sh
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
NPROC=${NPROC:-2}
mkdir -p "$OUT"

"$PY" -m dwconvert compress "$CKPT" -o "$OUT/mnist-dwpw.safetensors" --force \
    --arch digit_recognizer.model:CNN --input-shape 1,28,28 --form dw-pw --budget 0.125 \
    --budget-scope convertible
echo
# One thread per process, so that NPROC processes share the cores instead of fighting.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node "$NPROC" -m dwconvert finetune "$OUT/mnist-dwpw.safetensors" \
    --teacher "$CKPT" --data mnist5k --limit 4000 --val-offset 4000 --epochs 1 --lr 0.01 \
    --batch-size 16 -o "$OUT/mnist-dwpw-ft.safetensors" --force
