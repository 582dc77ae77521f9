#!/bin/bash
# Pixel likelihood and normalisation, measured (README, "Choices measured").
# usage: examples/measure_choices.sh SHARDS_DIR OUT_DIR
# SHARDS_DIR holds train-*.tar and val-*.tar from examples/emoji; about 40 minutes on 2 CPU cores.
# STEPS and LIMIT (environment) shorten it for a smoke test.
set -euo pipefail
shards=$1; out=$2; mkdir -p "$out"
train_shards=$(ls "$shards"/train-*.tar | paste -sd,)
val_shards=$(ls "$shards"/val-*.tar | paste -sd,)
small32=(
  --preset small --model-config norm=none
  --model-config resolution=32
  --model-config 'widths={"32": 32, "16": 64, "8": 96, "4": 128, "1": 128}'
  --model-config 'encoder_blocks={"32": 1, "16": 2, "8": 2, "4": 2, "1": 1}'
  --model-config 'latent_groups={"1": 1, "4": 2, "8": 2, "16": 1}'
)
train() {  # NAME SEED [more --model-config ...]
  local name=$1 seed=$2; shift 2
  [ -f "$out/$name/model/config.json" ] || inpaint train \
    --data "$train_shards" --val-data "$val_shards" \
    --out "$out/$name" "${small32[@]}" "$@" --steps "${STEPS:-600}" --batch-size 32 --lr 1.5e-3 \
    --warmup-steps 50 --val-every "${STEPS:-600}" --val-samples 512 --no-captions --num-workers 1 --seed "$seed"
  inpaint eval --data "$val_shards" --model "$out/$name/model" \
    --masks center --samples 4 --limit "${LIMIT:-1024}" --out "$out/eval-$name" > /dev/null
}
train logistic-none 0
train logistic-none-s1 1
train gaussian-none 0 --model-config pixel_distribution=gaussian
train logistic-group 0 --model-config norm=group
train logistic-batch 0 --model-config norm=batch
python - "$out" <<'PY'
import json, sys
from inpaint_cli.metrics import paired_bootstrap_interval
out = sys.argv[1]
names = ["logistic-none", "logistic-none-s1", "gaussian-none", "logistic-group", "logistic-batch"]
def per_image(name):
    d = json.load(open(f"{out}/eval-{name}/metrics.json"))["per_image"]
    nll = dict(zip(d["keys"], d["iwae_bits_per_dim"]))
    psnr = dict(zip(d["keys"], d["methods"]["model, mean of 4"]["psnr"]))
    return nll, psnr
runs = {name: per_image(name) for name in names}
keys = sorted(runs["logistic-none"][0])
for name in names:
    row = [name]
    for i, unit in ((0, "bits/dim"), (1, "dB")):
        vals = [runs[name][i][k] for k in keys]
        base = [runs["logistic-none"][i][k] for k in keys]
        gap = paired_bootstrap_interval(vals, base, resamples=2000)
        row.append(f"{sum(vals) / len(vals):.3f} {unit} ({gap.mean:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}])")
    print(" | ".join(row))
PY
