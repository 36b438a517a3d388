#!/usr/bin/env bash
# Text + image conditioned H&E model on the Kather 2016 colorectal tiles (8 tissue classes).
# Training: the 96 tiles bundled with mupad; held out: the other 69 tiles of the 165 in
# ../shared/data (never seen in training; used for FID/KID and the few-shot test set).
# Pixel space, 64 px (150 px tiles at 0.495 µm/px resized: 1.16 µm/px), the "tile" preset
# (the quality study's choice: 8 px tokens, hidden 256, depth 6, clean-image prediction
# through a 64-d patch bottleneck and a convolutional refinement head), decoupled
# text and image streams, the MUPAD objective (CNN alignment to cached Inception features +
# CLS denoising), random flips/quarter turns.
# fp32 by default: bf16 autocast pays off on GPUs and on CPUs with AMX, but was 18x slower
# than fp32 on an AVX2-only CPU (PRECISION=bf16 to choose it).
# Re-running resumes from the last checkpoint.
#
#   bash recipes/kather_text_image.sh [RUN_ROOT]      (default runs/kather)
set -euo pipefail
ROOT=${1:-runs/kather}
DATA=${MUPAD_SHARED_DATA:-../shared/data}/kather2016_crc_texture_samples
HERE=$(cd "$(dirname "$0")" && pwd)
BUNDLED=$(python -c "from mupad.data.tiles import bundled_kather_dir; print(bundled_kather_dir())")
mkdir -p "$ROOT"

python "$HERE/kather_split.py" --all "$DATA" --train "$BUNDLED" --heldout "$ROOT/heldout" \
    --captions "$ROOT/captions.json"
for split in train heldout; do
    source_dir=$([ "$split" = train ] && echo "$BUNDLED" || echo "$ROOT/heldout")
    mupad prepare "$source_dir" "$ROOT/shards_$split" --kind tiles --tile-size 64 \
        --tile-mpp 1.16 --captions "$ROOT/captions.json" --text-encoder minilm \
        --image-encoder inception
done
mupad train --shards "$ROOT/shards_train" --out "$ROOT/model" --preset tile \
    --conditions text,image --objective mupad --dihedral \
    --precision "${PRECISION:-fp32}" --steps "${STEPS:-20000}" --batch-size 16 --lr 2e-4 --warmup-steps 500 --ema-decay 0.999 \
    --checkpoint-every 250 --keep-checkpoints 0 --sample-every 1000 --seed 0
