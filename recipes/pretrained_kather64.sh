#!/usr/bin/env bash
# The pretrained model that ships inside mupad (mupad/assets/pretrained/kather64): the "tile"
# preset trained on the 96 Kather 2016 tiles bundled with mupad (CC BY 4.0) and nothing else,
# scored against the other 69 tiles of the public set, then packaged with its model card.
# Pixel space, 64 px crops, the class captions of `mupad demo` as the text condition.
# Re-running resumes the training run; STEPS sets its length (the learning rate is constant
# after the warm-up, so a longer run continues this one).
#
#   bash recipes/pretrained_kather64.sh [RUN_ROOT]      (default runs/pretrained)
set -euo pipefail
ROOT=${1:-runs/pretrained}
DATA=${MUPAD_SHARED_DATA:-../shared/data}/kather2016_crc_texture_samples
HERE=$(cd "$(dirname "$0")" && pwd)
BUNDLED=$(python -c "from mupad.data.tiles import bundled_kather_dir; print(bundled_kather_dir())")
mkdir -p "$ROOT"

python "$HERE/kather_split.py" --all "$DATA" --train "$BUNDLED" --heldout "$ROOT/heldout" \
    --captions "$ROOT/captions.json"
mupad train --data "$BUNDLED" --out "$ROOT/kather64" --preset tile --crop 64 \
    --captions "$ROOT/captions.json" --steps "${STEPS:-12000}" --batch-size 32 --lr 5e-4 \
    --warmup-steps 100 --ema-decay 0.999 --checkpoint-every 500 --keep-checkpoints 0 --seed 0
mupad evaluate generator --checkpoint "$ROOT/kather64" --real "$ROOT/heldout" \
    --train-real "$BUNDLED" --out "$ROOT/eval" --per-class 16 --sampler euler --steps 50 \
    --guidance-start "${GUIDANCE:-2.5}" --guidance-end 0
python "$HERE/package_pretrained.py" --run "$ROOT/kather64" --metrics "$ROOT/eval/metrics.json" \
    --out "${PACKAGE_OUT:-mupad/assets/pretrained/kather64}"
