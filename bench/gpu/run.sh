#!/bin/bash
# Issue 12's GPU run, one prepared script for a machine with one NVIDIA GPU, Python 3.12 and torch (no MONAI, no
# registry): the GPU inference speed of a Lite0 at 224 px (bench/predict_speed.py), then `make model`'s recipe at
# 160, 224 and 320 px and several seeds as parallel processes sharing the GPU (the augmentation is CPU-bound; one
# process per two cores), ensembles of the seeds, and a summary; outputs packed into $OUT (at most 8 files).
#   bash bench/gpu/payload.sh             (here, first: builds .payload/)
#   bash bench/gpu/run.sh                 (on the GPU machine, from the repo root with .payload/ beside it)
#   QUICK=1 PY=.venv/bin/python bash bench/gpu/run.sh     (a CPU dry run of the plumbing: 64 px, 1 epoch;
#                                                         tests/test_gpu_run.py runs it on a small D=payload)
#   BENCH=0 CONFIGS="r160e8s2:160:8:2 ..." ENSEMBLES="name:r160e8s2,..." KEEP="" bash bench/gpu/run.sh   (other runs)
set -u
T0=$(date +%s)
REPO=$(cd "$(dirname "$0")/../.." && pwd); cd $REPO
export D=${D:-$REPO/.payload} W=${W:-/tmp/radregion-gpu-run} PY=${PY:-python3} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/radregion-gpu-out}; mkdir -p $OUT
rm -rf $W; mkdir -p $W
exec > >(tee -a $OUT/log.txt) 2>&1
QUICK=${QUICK:-}
BUDGET=${BUDGET:-510}  # seconds from the start after which training is stopped and the results packed
if [ -z "$QUICK" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $D/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$REPO/lib:${PYTHONPATH:-}
export LIC=$(grep -m1 "^UNIFESP_LICENCE" Makefile | sed 's/^[^=]*= *//')
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null; echo "cores $(nproc)"
$PY -c "import torch, numpy, monai, sklearn, pydicom; print('torch', torch.__version__, 'numpy', numpy.__version__, 'monai', monai.__version__, 'sklearn', sklearn.__version__, 'cuda', torch.cuda.is_available())" || exit 1
lscpu | grep -m1 "Model name"
left() { echo $((T0 + BUDGET - $(date +%s))); }

if [ -z "$QUICK" ] && [ "${BENCH:-1}" = 1 ]; then
  echo "== bench/predict_speed.py on the GPU, random Lite0 at 224 px (t=$(($(date +%s) - T0)) s)"
  RADREGION_MODEL=/nonexistent timeout 90 $PY bench/predict_speed.py --arch efficientnet-lite0 --size 224 \
    --images $D/unifesp/images --limit 1364 --batch-size 256 --workers 14 --device cuda 2>&1 | tail -n 40
fi
if [ -z "$QUICK" ]; then  # NAME:SIZE:EPOCHS:SEED and NAME:MEMBER,MEMBER...; both can be given in the environment
  CONFIGS=${CONFIGS:-"r320e12s1:320:12:1 r320e12s0:320:12:0 r320e12s2:320:12:2 r320e20s1:320:20:1 r224e12s1:224:12:1 r224e12s0:224:12:0 r160e8s1:160:8:1 r160e8s0:160:8:0"}
  ENSEMBLES=${ENSEMBLES:-"320e12-s1s0:r320e12s1,r320e12s0 320e12-s1s0s2:r320e12s1,r320e12s0,r320e12s2 224e12-s1s0:r224e12s1,r224e12s0 160e8-s1s0:r160e8s1,r160e8s0"}
  THREADS=2
else  # the dry run: the first 79 train and 39 test rows, absolute paths
  mkdir -p $W/data/unifesp; cp -r $D/imagenet $W/data/imagenet
  for s in train:80 test:40; do
    head -${s#*:} $D/unifesp/${s%:*}.csv | sed "s#^images/#$D/unifesp/images/#" > $W/data/unifesp/${s%:*}.csv
  done
  export D=$W/data
  CONFIGS="q64s1:64:1:1 q64s0:64:1:0"; ENSEMBLES="q:q64s1,q64s0"; THREADS=1
fi

(while sleep 20; do echo "t=$(($(date +%s) - T0)) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null) load $(cut -d" " -f1 /proc/loadavg)"; done) > $W/gpu.log 2>&1 &
MON=$!
PIDS=""
echo "== fine-tunes in parallel (t=$(($(date +%s) - T0)) s, $(left) s left)"
for c in $CONFIGS; do
  IFS=: read name size ep seed <<< "$c"
  OMP_NUM_THREADS=$THREADS timeout --signal=KILL $(left) bash bench/gpu/config.sh $name $size $ep $seed &
  PIDS="$PIDS $!"
done
wait $PIDS  # not a bare wait: it would wait for the tee of the log too
kill $MON 2>/dev/null
echo "== fine-tunes over (t=$(($(date +%s) - T0)) s)"

for e in $ENSEMBLES; do  # probabilities averaged, OOD margins averaged (`evaluate --model A --model B`)
  name=${e%%:*}; args=(); ok=1
  for m in $(echo ${e#*:} | tr , " "); do [ -f $W/$m/model/bundle.json ] || ok=0; args+=(--model $W/$m/model); done
  [ $ok = 1 ] || { echo "ensemble $name: a member is missing"; continue; }
  t=$((T0 + BUDGET + 50 - $(date +%s))); [ $t -gt 60 ] && t=60
  [ $t -gt 5 ] || { echo "ensemble $name: no time left"; continue; }
  timeout $t $PY -m radregion.cli evaluate "${args[@]}" --labels $D/unifesp/test.csv --output $W/ens-$name/evaluation \
    > $W/ens-$name.log 2>&1 || { echo "ensemble $name failed"; tail -c 800 $W/ens-$name.log; }
done
echo "== summary (t=$(($(date +%s) - T0)) s)"
$PY bench/gpu/summary.py $W

# pack: the small results in one archive, then as many bundles (about 10 MB each) as 8 files and 62 MB allow
(cd $W && tar czf $OUT/results.tgz $(find . -name "figures.json" -o -name "predictions.csv" -o -name "*.log" | sed 's#^\./##'))
n=0; bytes=$(du -cb $OUT/* | tail -1 | cut -f1)
for m in ${KEEP-r320e12s1 r320e12s0 r320e12s2 r320e20s1 r224e12s1 r160e8s1 q64s1 q64s0}; do
  [ -f $W/$m/model/bundle.json ] || continue
  size=$(du -cb $W/$m/model | tail -1 | cut -f1)
  [ $n -lt 6 ] && [ $((bytes + size)) -lt 62000000 ] || continue
  tar cf $OUT/$m.tar -C $W/$m model && n=$((n + 1)) && bytes=$((bytes + size + 10240))
done
ls -la $OUT; echo "== end (t=$(($(date +%s) - T0)) s)"
