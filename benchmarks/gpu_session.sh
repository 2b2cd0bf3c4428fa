#!/bin/bash
# The prepared GPU check of results/perf.md ("On a GPU"): one script for a borrowed GPU machine with a deadline.
#
#   BENCH_DATA_DIR=DIR [BENCH_CACHE_DIR=DIR] [DEVICE=cuda] bash benchmarks/gpu_session.sh OUT [DEADLINE_S] [QUICK_CAP_S]
#
# 1. `bench run suites/paper-mnist.toml --dry-run --device cuda`: the probe's estimate for the paper grid.
# 2. `bench run suites/quick.toml --fresh --device cuda` alone, into OUT/quick with its own model cache: the
#    end-to-end proof (training, every attack, BPDA, substitutes, the quantized space) and its wall time.
# 3. paper-mnist's missing cells (and paper-mnist-10src's) in parallel slices, one process per defense group, each
#    resuming from a copy of the committed results/<suite>/cells.jsonl into OUT/<slice>; the models come from
#    BENCH_CACHE_DIR (carry the CPU-trained ones so that the grid stays one model per defense).
# Everything stops at DEADLINE_S (default 540) seconds after the start (Ctrl-C, then a kill 6 s later, to its own
# runs only); finished cells are kept (the runner appends each as it ends). OUT/events.txt has the time stamps, OUT/logs the output of each run. Merge the slices by cell id.
set -u
DEVICE=${DEVICE:-cuda}
OUT=${1:?usage: bash benchmarks/gpu_session.sh OUT [DEADLINE_S] [QUICK_CAP_S]}; DL=${2:-540}; QCAP=${3:-200}
: "${BENCH_DATA_DIR:?set BENCH_DATA_DIR to the folder holding mnist/}"
T0=$(date +%s); mkdir -p "$OUT/logs"
export BENCH_NO_PROGRESS=1 PYTHONUNBUFFERED=1
B="${PYTHON:-python3} -m bench.cli"
left() { echo $((DL - ($(date +%s) - T0))); }
stamp() { echo "$(($(date +%s) - T0)) s $*" | tee -a "$OUT/events.txt"; }
{ nvidia-smi; ${PYTHON:-python3} -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/logs/machine.txt" 2>&1
timeout 60 $B run suites/paper-mnist.toml --dry-run --device "$DEVICE" --out "$OUT/dry" --cache-dir "$OUT/dry-cache" \
  > "$OUT/logs/dry-paper-mnist.log" 2>&1
stamp "dry run rc=$?"
timeout "$QCAP" $B run suites/quick.toml --fresh --device "$DEVICE" --out "$OUT/quick" --cache-dir "$OUT/quick-cache" \
  > "$OUT/logs/quick.log" 2>&1
stamp "quick rc=$?"
slice() {  # NAME SUITE [--only ...]
  local name=$1 suite=$2 results; shift 2
  results=results/$(basename "$suite" .toml)
  mkdir -p "$OUT/$name"; cp "$results/cells.jsonl" "$results/plan.json" "$OUT/$name/"
  (timeout -s INT -k 6 "$(left)" $B run "$suite" --device "$DEVICE" --out "$OUT/$name" "$@" > "$OUT/logs/$name.log" 2>&1
   stamp "$name rc=$?") &
}
export OMP_NUM_THREADS=2
PM=suites/paper-mnist.toml
slice adv $PM --only 'defense=advtrain*'
slice dqa-dyn-pgd $PM --only 'defense=dqa(*dynamic*adv=pgd*'
slice dqa-fix-pgd $PM --only 'defense=dqa(*fixed*adv=pgd*'
slice dqa-dyn $PM --only 'defense=dqa(*dynamic*adv=none*'
slice dqa-fix $PM --only 'defense=dqa(*fixed*adv=none*'
slice tq6 $PM --only 'defense=tq(n=6*'
slice tq24 $PM --only 'defense=tq(n=2*,tq(n=4*'
slice cq23 $PM --only 'defense=cq(n=2*,cq(n=3*'
slice cq45 $PM --only 'defense=cq(n=4*,cq(n=5*'
slice rest $PM --only 'defense=cq(n=6*,none,brelu*,squeeze*'
slice 10src suites/paper-mnist-10src.toml
wait
stamp done
