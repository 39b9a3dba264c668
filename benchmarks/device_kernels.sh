#!/usr/bin/env bash
# One run on a CUDA machine (sized for an H200 lease: at most ~9.7 minutes, timeout_s=600) that measures the scoring
# kernels side by side with cuBLAS and torch, checks the low-precision modes against float64, and
# runs the kernel tests compiled on the GPU. Needs only torch, triton, numpy and this repository.
#
#   OUT=/some/dir bash benchmarks/device_kernels.sh      (OUT defaults to benchmarks/results)
#
# Writes into $OUT: kernels_{knn,mahalanobis,coreset}_cuda.json (machine, GPU, date, versions,
# command, one record per size x variant), kernels_device_log.txt, nvidia_smi.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
LOG="$OUT/kernels_device_log.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/nvidia_smi.txt" 2>&1
cat "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$LOG"
# Each op in its own process and time box, so one failure or overrun leaves the others' results.
# Boxes (580 s in all) leave room for cold compiles: since the tiles are fixed (no autotuning) each
# launch compiles one kernel, not 4-6 (the old boxes were smaller than the compile times: ~125 s for
# the kernel tests alone, and the coreset case, 16x slower with its spilling tile, died before its record).
timeout 230 python3 benchmarks/kernels.py knn --device cuda --out "$OUT" 2>&1 | tee -a "$LOG"
timeout 80 python3 benchmarks/kernels.py mahalanobis --device cuda --out "$OUT" 2>&1 | tee -a "$LOG"
timeout 120 python3 benchmarks/kernels.py coreset --device cuda --out "$OUT" 2>&1 | tee -a "$LOG"
timeout 150 python3 -m pytest tests/test_kernels_triton.py -q -p no:cacheprovider 2>&1 | tee -a "$LOG"
echo "device_kernels.sh done" | tee -a "$LOG"
