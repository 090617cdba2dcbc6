#!/bin/bash
# Builds .payload/ for bench/gpu/run.sh on the development machine, from the repo root:
#   bash bench/gpu/payload.sh        (about 64 MB: the labelled images, the ImageNet start, three wheels)
# What a bare GPU machine with Python 3.12 and torch lacks: the 1,364 labelled UNIFESP images with the model card's
# split (`make model`'s `radregion split --seed 0`), `make model`'s ImageNet start (`pretrain --epochs 0`), and
# wheels of MONAI, pydicom and efficientnet-lite-pytorch at the pins of constraints.txt. Never commit .payload/
# (the images' licence: CC BY-NC-SA 4.0; it is git-ignored).
set -eu
DATA=${DATA:-../shared/data}
RR=${RR:-.venv/bin/radregion}
licence() { grep -m1 "^$1" Makefile | sed 's/^[^=]*= *//'; }
pin() { grep -m1 -i "^$1==" constraints.txt; }
rm -rf .payload; mkdir -p .payload/unifesp .payload/whl
cp -r "$DATA/unifesp/images" "$DATA/unifesp/labels.csv" .payload/unifesp/
$RR split --labels .payload/unifesp/labels.csv --test-fraction 0.2 --seed 0 --output .payload/unifesp
rm .payload/unifesp/labels.csv
$RR pretrain --method simclr --arch efficientnet-lite0 --init imagenet --epochs 0 --size 160 \
  --images .payload/unifesp/train.csv --licence "$(licence LITE0_LICENCE)" --output .payload/imagenet
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .payload/whl \
  "$(pin monai)" "$(pin pydicom)" "$(pin efficientnet-lite-pytorch)"
du -sh .payload
