#!/usr/bin/env bash
# The model card's evaluations of a model trained on the emoji recipe (MODEL_CARD.md).
# usage: examples/emoji/evaluate.sh MODEL_DIR SHARDS_DIR PHOTOS_DIR OUT_DIR
# SHARDS_DIR holds val-*.tar and test-*.tar from build.sh; PHOTOS_DIR is what
# make_heldout_photos.py writes. About 20 minutes on 2 CPU cores.
set -euo pipefail
model=$1; shards=$2; photos=$3; out=$4
mkdir -p "$out"
val_shards=$(ls "$shards"/val-*.tar | paste -sd,)
test_shards=$(ls "$shards"/test-*.tar | paste -sd,)
score() {  # NAME, then inpaint eval options; the summary goes to NAME.txt
  local name=$1; shift
  inpaint eval --model "$model" --out "$out/$name" "$@" > "$out/$name.txt"
}

# Selection on validation only: the temperature of the samples (every report also scores the
# temperature-0 fill, the default of `inpaint run`).
for t in 0.5 0.8 1.0; do
  score "val_temperature_$t" --data "$val_shards" --masks center --samples 4 --limit 256 \
    --temperature "$t"
done

# Test concepts (never trained on or selected with) and held-out photographs.
score eval_center --data "$test_shards" --masks center --samples 8 --baselines \
  --caption-ablation --limit 600
score eval_photos --data "$photos" --masks center --samples 8 --baselines
score eval_stroke --data "$test_shards" --masks stroke --samples 8 --baselines --limit 300
