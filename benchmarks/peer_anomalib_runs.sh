#!/usr/bin/env bash
# The runs behind benchmarks/PEER.md, in priority order (each writes its own results JSON).
# Usage: nice -n 5 bash benchmarks/peer_anomalib_runs.sh [STEP...]   (default: all steps)
set -u
PY=${PEER_PY:-/work/anomalib-venv/bin/python}
S=benchmarks/peer_anomalib.py
D=/work/shared/data
W=${PEER_WORK:-/tmp/peer_anomalib}
MIXED=$W/mixed_bottle209_pcb600   # symlinks: bottle train/good (209) + pcb test (600)
mkdir -p $W
if [ ! -d $MIXED ]; then
  mkdir -p $MIXED/bottle_train_good $MIXED/pcb_test_good $MIXED/pcb_test_combined
  ln -s $D/mvtec_bottle/bottle/train/good/*.png $MIXED/bottle_train_good/
  ln -s $D/deeppcb/pcb/test/good/*.png $MIXED/pcb_test_good/
  ln -s $D/deeppcb/pcb/test/combined/*.png $MIXED/pcb_test_combined/
fi
BOTTLE="--root $D/mvtec_bottle --category bottle"
PCB="--root $D/deeppcb --category pcb"
step() { case " ${STEPS} " in *" $1 "*|"  ") return 0;; *) return 1;; esac; }
STEPS="${*:-}"
# vade's banks: 10% (256 px) / 2.5% (512 px) of the patches of 188 (bottle) / 360 (pcb) fit images
VB=19251; VP=36864

step rate && {
  $PY $S coreset-rate --size 256 --train-images 209 --iterations 60 --bank-rows $VB --result peer_anomalib_coreset_rate_bottle_256.json
  $PY $S coreset-rate --size 256 --train-images 400 --iterations 40 --bank-rows $VP --result peer_anomalib_coreset_rate_pcb_256.json
  $PY $S coreset-rate --size 512 --train-images 209 --iterations 20 --bank-rows $VB --result peer_anomalib_coreset_rate_bottle_512.json
  $PY $S coreset-rate --size 512 --train-images 400 --iterations 12 --bank-rows $VP --result peer_anomalib_coreset_rate_pcb_512.json
}
step b256v && $PY $S bench $BOTTLE --size 256 --bank-rows $VB --coreset random --fit-repeats 1 --predict-repeats 3 \
  --source $D/mvtec_bottle/bottle/test --workdir $W --tag bottle_256_vadebank
step unfam && {
  $PY $S bench $BOTTLE --size 256 --model $W/bottle_256_vadebank.pt --predict-repeats 1 \
    --source $D/deeppcb/pcb/test --workdir $W --tag bottle_256_vadebank_on_pcb_test
  $PY $S bench $BOTTLE --size 256 --model $W/bottle_256_vadebank.pt --predict-repeats 1 \
    --source $MIXED --workdir $W --tag bottle_256_vadebank_on_mixed
}
# pcb and 512 px: no engine.test (600 images again after the 600 of anomalib's validation); the predict over the test
# split gives the rate and an AUROC computed here from the raw scores.
step p256v && $PY $S bench $PCB --size 256 --bank-rows $VP --coreset random --fit-repeats 1 --predict-repeats 1 \
  --no-evaluate --source $D/deeppcb/pcb/test --workdir $W --tag pcb_256_vadebank
step b512v && $PY $S bench $BOTTLE --size 512 --bank-rows $VB --coreset random --fit-repeats 1 --predict-repeats 1 \
  --no-evaluate --source $D/mvtec_bottle/bottle/test --workdir $W --tag bottle_512_vadebank
step b256d && $PY $S bench $BOTTLE --size 256 --coreset-ratio 0.1 --coreset random --fit-repeats 1 --predict-repeats 1 \
  --source $D/mvtec_bottle/bottle/test --workdir $W --tag bottle_256_ratio0.1
step b512d && $PY $S bench $BOTTLE --size 512 --coreset-ratio 0.1 --coreset random --fit-repeats 1 --predict-repeats 1 \
  --source $D/mvtec_bottle/bottle/test --workdir $W --tag bottle_512_ratio0.1
step p256d && $PY $S bench $PCB --size 256 --coreset-ratio 0.1 --coreset random --fit-repeats 1 --predict-repeats 1 \
  --no-evaluate --source $D/deeppcb/pcb/test --workdir $W --tag pcb_256_ratio0.1
step p512v && $PY $S bench $PCB --size 512 --bank-rows $VP --coreset random --fit-repeats 1 --predict-repeats 1 \
  --no-evaluate --source $D/deeppcb/pcb/test --workdir $W --tag pcb_512_vadebank
exit 0
