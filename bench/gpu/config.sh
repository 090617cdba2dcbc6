#!/bin/bash
# One configuration of bench/gpu/run.sh: `make model`'s fine-tune at SIZE px for EPOCHS epochs with SEED, its head
# refitted with the held-out split, then `radregion evaluate` on the held-out split. The augmentation stays in the
# training process (--augment-workers 0, as the rows of docs/results.md ran): run.sh's processes share the cores.
#   bench/gpu/config.sh NAME SIZE EPOCHS SEED      (env: D data folder, W work folder, LIC licence, PY python)
name=$1 size=$2 ep=$3 seed=$4
d=$W/$name; mkdir -p $d
t0=$(date +%s)
$PY -m radregion.cli fit-head --model $D/imagenet --labels $D/unifesp/train.csv --fine-tune --epochs $ep \
  --size $size --lr 5e-4 --class-weights sqrt --outlier-exposure --seed $seed --half --licence "$LIC" --workers 2 \
  --augment-workers 0 --output $d/fine-tuned > $d/finetune.log 2>&1 || { echo "$name: fine-tune failed"; tail -c 1500 $d/finetune.log; exit 1; }
t1=$(date +%s)
$PY -m radregion.cli fit-head --model $d/fine-tuned --labels $D/unifesp/train.csv --seed $seed --half \
  --held-out $D/unifesp/test.csv --licence "$LIC" --workers 2 --output $d/model > $d/head.log 2>&1 \
  || { echo "$name: head failed"; tail -c 1500 $d/head.log; exit 1; }
$PY -m radregion.cli evaluate --model $d/model --labels $D/unifesp/test.csv --output $d/evaluation > $d/evaluate.log 2>&1 \
  || { echo "$name: evaluate failed"; tail -c 1500 $d/evaluate.log; exit 1; }
echo "$name: done, fine-tune $((t1 - t0)) s, head + evaluate $(( $(date +%s) - t1 )) s"
