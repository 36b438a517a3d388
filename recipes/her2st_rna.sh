#!/usr/bin/env bash
# RNA/ST-conditioned H&E model on the HER2ST breast sections (legacy ST, 100 µm spots).
# One 128 µm patch per spot (64 px, 2 µm/px) paired with the spot's ssGSEA pathway scores
# (the bundled WikiPathways collection, pathways scored in every section; the 128 varying
# most across the training spots, PATHWAYS=0 for all 757); sections B4 and
# C2-C5 train, C6 is held out. The "tile" preset in pixel space (8 px tokens, hidden 256,
# depth 6, clean-image prediction, patch bottleneck, convolutional refinement head) with
# the RNA stream (one token per pathway), the MUPAD objective against cached Inception features, random flips/quarter turns.
# fp32 by default: bf16 autocast pays off on GPUs and on CPUs with AMX, but was 18x slower
# than fp32 on an AVX2-only CPU (PRECISION=bf16 to choose it). Re-running resumes.
#
#   bash recipes/her2st_rna.sh [RUN_ROOT]      (default runs/her2st_rna)
set -euo pipefail
ROOT=${1:-runs/her2st_rna}
DATA=${MUPAD_SHARED_DATA:-../shared/data}/her2st_he_spatial_expression_6sections
HERE=$(cd "$(dirname "$0")" && pwd)
SECTIONS=B4,C2,C3,C4,C5,C6
mkdir -p "$ROOT/st"

for section in ${SECTIONS//,/ }; do
    [ -f "$ROOT/st/$section/scores.csv" ] ||
        mupad st extract "$DATA" --section "$section" --out "$ROOT/st/$section" --size 64 --patch-um 128
done
python "$HERE/her2st_pairs.py" "$ROOT/st" --sections "$SECTIONS" --val C6 \
    --max-pathways "${PATHWAYS:-128}"
for split in train val; do
    (cd "$ROOT/st" && mupad prepare "pairs_$split.csv" "../shards_$split" --tile-size 64 \
        --tile-mpp 2.0 --image-encoder inception --rna-gene-sets bundled)
done
mupad train --shards "$ROOT/shards_train" --out "$ROOT/model" --preset tile \
    --conditions rna --objective mupad --dihedral \
    --precision "${PRECISION:-fp32}" --steps "${STEPS:-20000}" --batch-size 16 \
    --lr 2e-4 --warmup-steps 500 --ema-decay 0.999 --checkpoint-every 250 --keep-checkpoints 0 \
    --sample-every 1000 --seed 0
