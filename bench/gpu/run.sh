#!/usr/bin/env bash
# Every GPU check and side-by-side figure plumb owes, in one call on a lent GPU machine, from
# the repository root there, with devrun/ (bench/gpu/pack.sh) carried:
#   bash bench/gpu/run.sh [STEP ...]     (default: all steps)
# Steps: tests (the CUDA unit tests: graphs, memory statistics, fused AdamW, bf16 autocast,
# graph decoding = eager decoding), nccl (NCCL collectives and gradients at world size 1, the
# all-reduce benchmark, one rank pretraining under NCCL), generate (beside
# transformers.generate, with and without CUDA graphs), train (beside hf_baseline.py's
# training step), ppo (beside TRL), quickstart (the quickstart's pipeline, shortened).
# Logs go to $OUT/NAME.log (at most 8 files come back: the steps write one each); each step
# prints PASS or FAIL and its log's tail. About 5 minutes for all of them on an H200.
TV=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH=$TV/torch/lib:$TV/nvidia/cu13/lib:$TV/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/plumb-gpu}
mkdir -p "$OUT" /tmp/bin
tar xJf devrun/bin.tar.xz -C /tmp/bin || { echo "no devrun/bin.tar.xz: run bench/gpu/pack.sh and carry devrun"; exit 1; }
B=/tmp/bin P=/tmp/bin/plumb
# The end-to-end NCCL test runs this plumb and this checkout's data.
export PLUMB_BIN=$P PLUMB_REPO_ROOT=$PWD
steps=${*:-tests nccl generate train ppo quickstart}

# check NAME LIMIT_S EXPECT CMD...: CMD under `timeout`, output appended to $OUT/NAME.log; PASS
# when it exits 0, its log matches the extended regex EXPECT, and no CUDA test was skipped.
check() {
    local name=$1 limit=$2 expect=$3; shift 3
    echo "=== $name: $*" | tee -a "$OUT/$name.log"
    local t0=$SECONDS verdict=PASS
    timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 0 ] || verdict="FAIL (exit $rc)"
    grep -Eq "$expect" "$OUT/$name.log" || verdict="FAIL (no /$expect/ in the log)"
    grep -Eq "did not run|skipped: libtorch sees no CUDA" "$OUT/$name.log" && verdict="FAIL (a CUDA check was skipped)"
    echo "$verdict in $((SECONDS - t0)) s"
    tail -n "${TAIL:-8}" "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.used,driver_version,clocks.sm --format=csv
for step in $steps; do case $step in
tests)
    TAIL=12 check tests 90 'test result: ok' $B/core_lib_tests cuda --test-threads 1 --nocapture ;;
nccl)
    export NCCL_DEBUG=VERSION
    TAIL=10 check nccl 60 'test result: ok\. 3 passed' $B/nccl --test-threads 1 --nocapture
    TAIL=12 check nccl 40 'backend: nccl' $P bench allreduce --device cuda --nproc 1 --min-mib 1 --max-mib 256 --repeats 5
    TAIL=10 check nccl 60 'test result: ok\. 1 passed' $B/distributed one_rank_pretrains_on_cuda_with_nccl_attached --exact --nocapture
    unset NCCL_DEBUG ;;
generate)
    TAIL=2 check generate 150 speedup $P bench generate --shape llama-125m --batch 1,64 --prompt-len 64 --new-tokens 256 --device cuda --transformers python3 --json
    TAIL=2 check generate 90 growing $P bench generate --shape llama-125m --batch 1,64 --prompt-len 64 --new-tokens 256 --device cuda --steps growing --json ;;
train)
    for shape in llama-125m llama-350m llama-1b; do
        TAIL=1 check train 60 tokens_per_s $P bench train --shape $shape --device cuda --precision bf16 --peak-flops 790e12 --json
    done
    TAIL=3 check train 120 peak_mem_gb python3 -c "import sys; sys.path.insert(0, 'devrun'); import hf_baseline as h; [h.train(*c) for c in [('llama-125m', 16, 1024), ('llama-350m', 8, 1024), ('llama-1b', 8, 1024)]]" ;;
ppo)
    TAIL=5 check ppo 90 ppo-median $P bench ppo --device cuda --iterations 3 --repeats 3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site devrun/whl/*.whl >> "$OUT/ppo.log" 2>&1
    TAIL=3 PYTHONPATH=/tmp/site check ppo 150 'median: .* episodes/s' python3 bench/trl_ppo.py --iterations 4 --repeats 3 --device cuda ;;
quickstart)
    TAIL=14 check quickstart 150 'run quickstart finished' $P run recipes/quickstart.yaml run.device=cuda run.output_dir=/tmp/qs \
        rewards.judge.config.model=/tmp/qs/reward_model/final --overwrite ;;
*) echo "unknown step $step (tests nccl generate train ppo quickstart)"; exit 2 ;;
esac; done
