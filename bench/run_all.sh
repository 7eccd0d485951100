#!/usr/bin/env bash
# Every benchmark of BENCHMARKS.md, one after another in one session, each with the command its section names;
# the output of each goes to $OUT/<name>.log (default /tmp/vlsearch-bench) and the machine's description to
# $OUT/machine.txt. Speed and quality only: nothing here changes the repository (vlm_eval runs with --no-log, without --calibrate).
# Not in CI (about an hour on 2 cores). The GPU scripts (bench/faiss_gpu.py, bench/rerank.py --full-size on cuda)
# need a GPU and are left out; run them where one is.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vlsearch-bench}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

{
    date -u +"%Y-%m-%d %H:%M UTC"
    echo "cores: $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "memory: $(free -g | awk '/^Mem:/ {print $2}') GiB; $(uname -sr)"
    "$PY" -c 'import faiss, torch, PIL, open_clip; print(f"torch {torch.__version__}, faiss {faiss.__version__}, Pillow {PIL.__version__}, open_clip {open_clip.__version__}")'
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$OUT/machine.txt"

run() {  # name, then the command
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$OUT/summary.txt"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - start)) s; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/summary.txt"
}

run indexing "$PY" bench/indexing.py --images 100 --rounds 3
run workers "$PY" bench/workers.py --images 300 --rounds 2
run rerank-photos "$PY" bench/rerank.py --photos
run rerank-full-size "$PY" bench/rerank.py --full-size
run rerank-quantization "$PY" bench/rerank.py --quantization --threads 1 --repeats 2
run api "$PY" bench/api.py
# The stores at 200k with every kind and at 1M flat (HNSW and IVF-PQ builds at 1M take 10-15 min each here).
run stores env OMP_NUM_THREADS=2 "$PY" -m bench.stores --kinds flat hnsw ivfpq --large-kinds flat --isotropic-size 0
run eval .venv/bin/vlsearch eval
run vlm-eval "$PY" -m models.vlm_eval --no-log
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/machine.txt"
