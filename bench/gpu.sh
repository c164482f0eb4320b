#!/usr/bin/env bash
# One prepared run of the benchmarks on a GPU machine, at most ~5 minutes of wall time.
#
#   bash bench/gpu.sh [OUTDIR]          # OUTDIR defaults to $OUT, else /tmp/realscore-gpu
#
# Runs, each under its own time cap so the whole fits in 5 minutes:
#   1. `pytest -m gpu` on the test files that carry the mark (summary line -> pytest-gpu.txt);
#   2. bench/pipeline.py    --tower large14 --device cuda, decode modes gpu and exact,
#      --procs-per-gpu 1 and 4 (-> pipeline.md), capped to leave step 3 at least 70 s;
#   3. bench/preprocess.py  --tower large14 --device cuda --seconds 1 (-> preprocess.md), with
#      whatever time is left.
# Each table row is written to OUTDIR as soon as it is measured, and everything is printed.
#
# The GPU machine has torch, torchvision, transformers, Pillow, numpy and prometheus-client but no
# Celery, Redis, boto3 or pydantic and no registry. They travel with the checkout:
#   .whl/    py3.12 manylinux wheels of every missing package (installed into /tmp/site here)
#   .redis/  Debian's redis-server plus the shared libraries it links, run with LD_LIBRARY_PATH
# (both git-ignored: name them in the device tool's `carry`).
#
# Knobs (environment; not REALSCORE_* since the service refuses REALSCORE_* variables that are no
# setting, and these would reach its workers; REALSCORE_BENCH_* spellings are taken and unset):
# BENCH_DEVICE (cuda), BENCH_TOWER (large14), BENCH_DECODE (gpu,exact), BENCH_PROCS (1,4),
# BENCH_IMAGES (1024), BENCH_SECONDS (6), BENCH_PYTHON (python3), BENCH_CARRY_DIR (the repo root:
# where .whl/ and .redis/ are), BENCH_BUDGET_S (290). A CPU rehearsal:
#   BENCH_DEVICE=cpu BENCH_TOWER=tiny bash bench/gpu.sh /tmp/gpuout
set -u
began=$(date +%s)
cd "$(dirname "$0")/.."
REPO=$PWD
OUTDIR=${1:-${OUT:-/tmp/realscore-gpu}}
mkdir -p "$OUTDIR"
for knob in DEVICE TOWER DECODE PROCS IMAGES SECONDS PYTHON CARRY_DIR BUDGET_S; do
    legacy=REALSCORE_BENCH_$knob
    if [ -n "${!legacy:-}" ]; then
        current=BENCH_$knob
        [ -z "${!current:-}" ] && export "BENCH_$knob=${!legacy}"
    fi
    unset "$legacy"
done
unset REALSCORE_BENCH_REDIS_SERVER
DEVICE=${BENCH_DEVICE:-cuda}
TOWER=${BENCH_TOWER:-large14}
DECODE=${BENCH_DECODE:-gpu,exact}
PROCS=${BENCH_PROCS:-1,4}
IMAGES=${BENCH_IMAGES:-1024}
SECONDS_EACH=${BENCH_SECONDS:-6}
PY=${BENCH_PYTHON:-python3}
CARRY=${BENCH_CARRY_DIR:-$REPO}
BUDGET=${BENCH_BUDGET_S:-290}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUTDIR/gpu-sh.log"
say() { echo "[gpu.sh $(($(date +%s) - began))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - ($(date +%s) - began))); }

# 1. Packages: install the carried wheels where the machine lacks them.
if "$PY" -c 'import celery, kombu, redis, pydantic_settings, boto3' 2>/dev/null; then
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    say "celery, redis, pydantic-settings, boto3 already importable: no wheels installed"
else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$CARRY"/.whl/*.whl && export PYTHONPATH=/tmp/site:$REPO || {
        say "FAILED: installing $CARRY/.whl"; exit 1; }
    "$PY" -c 'import celery, kombu, redis, pydantic_settings, boto3' || {
        say "FAILED: carried packages do not import"; exit 1; }
    say "installed $(ls "$CARRY"/.whl/*.whl | wc -l) carried wheels into /tmp/site"
fi

# 2. redis-server: the carried one (with its libraries) if there is one, else the PATH's.
if [ -x "$CARRY/.redis/redis-server" ]; then
    mkdir -p /tmp/realscore-redis
    cat >/tmp/realscore-redis/redis-server <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$CARRY/.redis/lib" exec "$CARRY/.redis/redis-server" "\$@"
EOF
    chmod +x /tmp/realscore-redis/redis-server
    export BENCH_REDIS_SERVER=/tmp/realscore-redis/redis-server
fi
"${BENCH_REDIS_SERVER:-redis-server}" --version 2>&1 | tee -a "$LOG" || {
    say "FAILED: no runnable redis-server"; exit 1; }
{ "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'; nproc; } 2>&1 | tee -a "$LOG"

# 3. The GPU tests (files with the gpu mark only: the others need moto, fakeredis...).
gpu_tests=$(grep -l 'mark.gpu' tests/test_*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$gpu_tests" ]; then
    say "pytest -m gpu $gpu_tests"
    timeout -k 5 40 "$PY" -m pytest -q -p no:cacheprovider -m gpu -o addopts= $gpu_tests \
        >"$OUTDIR/pytest-gpu.log" 2>&1
    say "pytest -m gpu exit $?: $(tail -n 1 "$OUTDIR/pytest-gpu.log")"
    tail -n 1 "$OUTDIR/pytest-gpu.log" >"$OUTDIR/pytest-gpu.txt"
else
    say "no test file carries the gpu mark" | tee "$OUTDIR/pytest-gpu.txt"
fi

# 4. The pipeline, layer by layer (leaving bench/preprocess.py at least 70 s).
cap=$(( $(left) - 70 ))
if [ "$cap" -ge 30 ]; then
    say "bench/pipeline.py (cap ${cap}s)"
    timeout -k 10 "$cap" "$PY" bench/pipeline.py --tower "$TOWER" --device "$DEVICE" \
        --decode "$DECODE" --procs-per-gpu "$PROCS" --images "$IMAGES" --seconds "$SECONDS_EACH" \
        --start-timeout 120 --out "$OUTDIR/pipeline.md" 2>&1 | tee -a "$LOG"
    say "pipeline.py exit ${PIPESTATUS[0]}"
else
    say "skipped bench/pipeline.py: ${cap}s left for it"
fi

# 5. Preprocessing modes, with what is left.
if [ -f bench/preprocess.py ]; then
    cap=$(( $(left) - 5 ))
    if [ "$cap" -ge 20 ]; then
        say "bench/preprocess.py (cap ${cap}s)"
        timeout -k 5 "$cap" "$PY" bench/preprocess.py --tower "$TOWER" --device "$DEVICE" \
            --seconds 1 --out "$OUTDIR/preprocess.md" 2>&1 | tee -a "$LOG"
        say "preprocess.py exit ${PIPESTATUS[0]}"
    else
        say "skipped bench/preprocess.py: ${cap}s left for it"
    fi
else
    say "bench/preprocess.py is not in this checkout"
fi

say "done in $(($(date +%s) - began)) s; tables:"
cat "$OUTDIR"/pytest-gpu.txt "$OUTDIR"/pipeline.md "$OUTDIR"/preprocess.md 2>/dev/null
