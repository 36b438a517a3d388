#!/usr/bin/env bash
# RNA/ST conditioning fidelity of the HER2ST model (recipes/her2st_rna.sh) on the held-out
# section C6: each spot's patches are generated from its pathway scores alone and compared
# with its own real patch and with every other spot's (Inception features, cell-type
# proportions, nuclei density at 2 µm/px; see `mupad evaluate rna --help`), beside the
# nearest-expression training patch (retrieval by pathway scores, no generator).
# Sampling: Euler ODE, 50 steps, guidance annealed 2.5 -> 0 (SAMPLER=sde STEPS=250 for the
# paper's). Re-running reuses the generated patches.
#
#   bash recipes/her2st_evaluate.sh [RUN_ROOT]      (default runs/her2st_rna)
set -euo pipefail
ROOT=${1:-runs/her2st_rna}
mupad evaluate rna --checkpoint "$ROOT/model" --pairs "$ROOT/st/pairs_val.csv" --per-spot 2 \
    --reference-pairs "$ROOT/st/pairs_train.csv" \
    --mpp 2.0 --sampler "${SAMPLER:-euler}" --steps "${STEPS:-50}" --out "$ROOT/eval/rna"
