#!/bin/bash
# Pretraining vs training from scratch, paired on bench/cv.py's grouped CV folds at (about) equal
# total CPU: per fold, SimSiam on that fold's training split only, then the two-phase fine-tune of
# the `cpu` preset from it, paired with `--preset cpu` from scratch on the same fold and seed.
#
#   bench/pretrain_cv.sh RESULTS_DIR "0 1" [PRETRAIN_EPOCHS] [FINETUNE_EPOCHS]
#
# Defaults (7 SimSiam epochs + 2 frozen-head + 24 all-layer epochs at the preset's learning rate)
# spend about the CPU of the preset's 34 scratch epochs (README, section Pretraining). Folds are
# the ones bench/cv.py writes into RESULTS_DIR/folds (made by its first call); the pretraining
# CPU time is printed per fold ("pretrain wall ... CPU ..."); bench/cv.py prints the rest.
set -euo pipefail
RESULTS=${1:?results folder of bench/cv.py}
FOLDS=${2:-0 1}
PRE_EPOCHS=${3:-7}
FT_EPOCHS=${4:-24}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
PRE="$RESULTS/pretrained-e$PRE_EPOCHS"
CONFIG="$PRE/finetune.yaml"
mkdir -p "$PRE"
printf 'train:\n  finetune_lr_factor: 1.0\n' > "$CONFIG"
A="--preset cpu"
B="--preset cpu --weights regnet=$PRE/fold{fold}/regnet-200mf.weights.h5 --head-epochs 2 --epochs $FT_EPOCHS --config $CONFIG"
TIMEFORMAT='pretrain wall %R s, CPU %U user + %S sys s'
# the fold manifests exist after bench/cv.py's first call; --report-only makes them
"$PYTHON" bench/cv.py --results "$RESULTS" --recipe "$A" --report-only > /dev/null
for f in $FOLDS; do
  if [ ! -f "$PRE/fold$f/regnet-200mf.weights.h5" ]; then
    echo "fold $f: pretraining $PRE_EPOCHS epochs on its training split"
    time "$PYTHON" -m lungtf.pretrain --splits "$RESULTS/folds/fold$f.csv" --split train \
      --backbones regnet:200mf --image-size 128 --crop-size 64 --epochs "$PRE_EPOCHS" \
      --out "$PRE/fold$f" --verbose 2
  fi
  "$PYTHON" bench/cv.py --results "$RESULTS" --recipe "$A" --vs "$B" --fold "$f" --verbose 2
done
"$PYTHON" bench/cv.py --results "$RESULTS" --recipe "$A" --vs "$B" --report-only
