#!/usr/bin/env bash
# The model card's evaluations of a model trained on the emoji recipe (MODEL_CARD.md).
# usage: examples/emoji/evaluate.sh MODEL_DIR SHARDS_DIR PHOTOS_DIR OUT_DIR
# SHARDS_DIR holds val-*.tar and test-*.tar from build.sh; PHOTOS_DIR is what
# make_heldout_photos.py writes. About 30 minutes on 2 CPU cores.
set -euo pipefail
model=$1; shards=$2; photos=$3; out=$4
mkdir -p "$out"
val_shards=$(ls "$shards"/val-*.tar | paste -sd,)
test_shards=$(ls "$shards"/test-*.tar | paste -sd,)
score() {  # NAME, then inpaint eval options; the summary goes to NAME.txt
  local name=$1; shift
  # a finished evaluation is kept, so a killed or partial rerun only does what is missing
  [[ -f "$out/$name/metrics.json" ]] && return
  inpaint eval --model "$model" --out "$out/$name" "$@" > "$out/$name.txt"
}

# Selection on validation only. First the caption strength (true captions mixed with the
# learned empty one): the lowest hole NLL with true captions.
strengths="0.2 0.3 0.4 0.5 0.7 1.0"
for s in $strengths; do
  score "val_caption_strength_$s" --data "$val_shards" --masks center --samples 1 --limit 256 \
    --caption-ablation --caption-strength "$s"
done
best_s=$(python - "$out" $strengths <<'PY'
import json, sys
out, strengths = sys.argv[1], sys.argv[2:]
def true_caption_nll(s):
    metrics = json.load(open(f"{out}/val_caption_strength_{s}/metrics.json"))
    return metrics["caption_ablation"]["true_bits_per_dim"]
print(min(strengths, key=true_caption_nll))
PY
)
echo "captions at strength $best_s (lowest hole NLL with true captions on validation)"

# Then the temperature of the samples (every report also scores the temperature-0 fill, the
# default of `inpaint run`).
temperatures="0.2 0.3 0.5 0.8 1.0"
for t in $temperatures; do
  score "val_temperature_$t" --data "$val_shards" --masks center --samples 4 --limit 256 \
    --temperature "$t" --caption-strength "$best_s"
done
best_t=$(python - "$out" $temperatures <<'PY'
import json, sys
out, temperatures = sys.argv[1], sys.argv[2:]
def mean_of_samples(t):
    methods = json.load(open(f"{out}/val_temperature_{t}/metrics.json"))["methods"]
    return methods["model, mean of 4"]["psnr"]
print(max(temperatures, key=mean_of_samples))
PY
)
echo "samples are drawn at temperature $best_t (best mean of 4 on validation)"

# Test concepts (never trained on or selected with) and held-out photographs.
chosen=(--temperature "$best_t" --caption-strength "$best_s")
score eval_center --data "$test_shards" --masks center --samples 8 "${chosen[@]}" \
  --baselines --caption-ablation --limit 600
score eval_photos --data "$photos" --masks center --samples 8 "${chosen[@]}" --baselines
score eval_stroke --data "$test_shards" --masks stroke --samples 8 "${chosen[@]}" \
  --baselines --limit 300
