#!/usr/bin/env bash
# Packs what bench/gpu/run.sh needs on a lent GPU machine (which has no Rust and no network)
# into devrun/ (git-ignored; carry it): release plumb and plugins, and the test binaries whose
# CUDA checks run there, stripped and compressed (the device tool carries 64 MiB at most);
# hf_baseline.py from ../shared; TRL and the packages it lacks there, as wheels.
# Usage, where cargo and libtorch are set up (source the environment ./dev env prints):
#   bench/gpu/pack.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p devrun/bin
grep -qx '/devrun/' .git/info/exclude 2>/dev/null || echo '/devrun/' >> .git/info/exclude

# The test executable cargo builds for `cargo test --release ARGS --no-run`.
executable() {
    local log path
    log=$(cargo test --release "$@" --no-run 2>&1) || { echo "$log" >&2; exit 1; }
    path=$(echo "$log" | sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
    [ -n "$path" ] && [ -x "$path" ] || { echo "$log" >&2; echo "pack: no executable for cargo test $*" >&2; exit 1; }
    echo "$path"
}

cargo build --release --workspace
staging=$(mktemp -d)
for f in plumb libplumb_pretrain.so libplumb_sft.so libplumb_rlhf.so libplumb_cot.so; do
    strip -o "$staging/$f" "target/release/$f"
done
strip -o "$staging/core_lib_tests" "$(executable -p plumb-core --lib)"
strip -o "$staging/nccl" "$(executable -p plumb-core --test nccl)"
strip -o "$staging/distributed" "$(executable -p plumb --test distributed)"
(cd "$staging" && tar cf - ./*) | xz -T0 -6 > devrun/bin.tar.xz
rm -rf "$staging"
cp ../shared/bench/hf_baseline.py devrun/
mkdir -p devrun/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d devrun/whl trl==1.12.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh devrun
