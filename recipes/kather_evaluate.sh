#!/usr/bin/env bash
# Measurements of the Kather text + image model (recipes/kather_text_image.sh), on the 69
# held-out tiles that training never saw:
#   generator/  FID/KID (bootstrap intervals, with noise and blurred-real reference points) and
#               class-conditioning accuracy (a classifier fitted on the training tiles labels
#               tiles generated from each class caption), for every kept checkpoint;
#   augment/ + fewshot/  the paper's few-shot protocol: ResNet-18 from scratch on k = 5, 10
#               real training tiles per class, with vs without 4 generated variations of each
#               shot, 5 seeds, tested on the held-out tiles;
#   ablation/   decoupled vs shared cross-attention (text + image streams), the same backbone,
#               data, seed and steps, scored by held-out velocity MSE with both conditions,
#               each alone, and none;
#   ablation_objectives/  the sit, repa and MUPAD objectives on the same setting, scored alike.
# CHECKPOINTS=1000,2000 scores only those checkpoints (default: every kept one).
# Sampling: Euler ODE, 50 steps, guidance annealed 2.5 -> 0 (the 250-step SDE costs 5x more on
# a CPU; SAMPLER=sde STEPS=250 for the paper's). Re-running reuses what is done.
#
#   bash recipes/kather_evaluate.sh [RUN_ROOT]      (default runs/kather)
set -euo pipefail
ROOT=${1:-runs/kather}
BUNDLED=$(python -c "from mupad.data.tiles import bundled_kather_dir; print(bundled_kather_dir())")
SAMPLING=(--sampler "${SAMPLER:-euler}" --steps "${STEPS:-50}")

mupad evaluate generator --checkpoint "$ROOT/model" --real "$ROOT/heldout" \
    --train-real "$BUNDLED" --captions "$ROOT/captions.json" --checkpoints "${CHECKPOINTS:-all}" \
    --per-class 16 --small-sample allow "${SAMPLING[@]}" --out "$ROOT/eval/generator"
mupad augment --data "$BUNDLED" --checkpoint "$ROOT/model" --captions "$ROOT/captions.json" \
    --per-image 4 "${SAMPLING[@]}" --out "$ROOT/eval/augment"
mupad evaluate fewshot --train "$BUNDLED" --test "$ROOT/heldout" \
    --augmented "$ROOT/eval/augment" --shots 5,10 --seeds 5 --epochs 50 --size 32 \
    --out "$ROOT/eval/fewshot"
for arms in attention objectives; do
    # attention: decoupled vs shared, 800 steps; objectives: sit, repa, MUPAD, 400 steps.
    steps=$([ "$arms" = attention ] && echo "${ABLATION_STEPS:-800}" || echo "${OBJECTIVES_STEPS:-400}")
    out=$([ "$arms" = attention ] && echo "$ROOT/ablation" || echo "$ROOT/ablation_objectives")
    mupad ablate --shards "$ROOT/shards_train" --val-shards "$ROOT/shards_heldout" \
        --out "$out" --arms "$arms" --conditions text,image --preset S/8 \
        --hidden-size 256 --depth 6 --num-heads 4 --steps "$steps" \
        --eval-every 200 --eval-records 69 --batch-size 16 --lr 2e-4 --warmup-steps 100 \
        --ema-decay 0.999 --precision fp32 --seed 0 \
        --metrics velocity_mse,velocity_mse_text_only,velocity_mse_image_only,velocity_mse_unconditional
done
