#!/usr/bin/env bash
# The GPU checks of the CUDA path (docs/cuda.md), in one go. Two halves, because the GPU machine has no Rust
# toolchain and at most 64 MiB travels with a run:
#
#   tools/gpu_check.sh build    # here: builds the check binaries with CUDA + flash-attn (tools/build_cuda.sh) and
#                               # packs them, xz-compressed, into gpu-bundle/ (git-ignored; carry it)
#   tools/gpu_check.sh run      # there, from the repository root: runs every check, results under $OUT (or
#                               # gpu-results/): gpu_check.log (everything) and results.jsonl (one JSON per row)
#
# Checks (crates/dinov2-model/benches/gpu_check.rs and crates/dinov2-train/benches/bench_step.rs):
#   0. dinov2-flash-attn's own tests (varlen forward and the three gradients vs explicit f32 attention)
#   a. packed attention, 2x261 + 8x54 tokens, bf16 and f16, every backend, forward and gradients vs f32
#   b. whole-model outputs bf16/f16 vs the CPU f32 forward of the same weights, and bf16 mixed-precision gradients
#   c. images/s of ViT-S/B/L/14 at 224 (batch 64) and 518 (batch 8), bf16, against timm + PyTorch SDPA on the same
#      GPU, rounds interleaved (GPU_CHECK_ROUNDS, default 2)
#   d. packed vs per-size vs padded for 2x224 + 8x98 crops per image
#   e. the training step (ViT-S/14 and ViT-B/14, batch 32 per GPU, 2x224 + 8x98, bf16 mixed precision) and its
#      peak GPU memory (nvidia-smi, sampled every 100 ms)
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUNDLE="$ROOT/gpu-bundle"
cmd="${1:-run}"

build() {
    set -e
    local env_file
    env_file="$(mktemp)"
    "$ROOT/tools/build_cuda.sh" env >"$env_file"
    # shellcheck disable=SC1090
    source "$env_file"
    rm -f "$env_file"
    cd "$ROOT"
    local features="${GPU_CHECK_FEATURES:-flash-attn}"
    cargo build --release --locked -p dinov2-model --features "$features" --bench gpu_check
    cargo build --release --locked -p dinov2-train --features cuda,dinov2-model/$features --bench bench_step
    cargo test --release --locked -p dinov2-flash-attn --features cuda --no-run
    mkdir -p "$BUNDLE"
    rm -f "$BUNDLE"/*
    newest() { ls -t $1 2>/dev/null | grep -v '\.d$' | head -n 1; }
    cp "$(newest "$CARGO_TARGET_DIR/release/deps/gpu_check-*")" "$BUNDLE/gpu_check"
    cp "$(newest "$CARGO_TARGET_DIR/release/deps/bench_step-*")" "$BUNDLE/bench_step"
    cp "$(newest "$CARGO_TARGET_DIR/release/deps/dinov2_flash_attn-*")" "$BUNDLE/flash_attn_tests"
    for f in "$BUNDLE"/*; do
        strip "$f"
        xz -T0 -6 "$f"
    done
    cp "$ROOT/tools/gpu_bench_torch.py" "$BUNDLE/"
    ls -l "$BUNDLE"
    du -sh "$BUNDLE"
}

run() {
    local out="${OUT:-$ROOT/gpu-results}" bin="/tmp/dinov2-gpu-check"
    mkdir -p "$out" "$bin"
    local log="$out/gpu_check.log" jsonl="$out/results.jsonl"
    : >"$log"
    : >"$jsonl"
    say() { echo "== $*" | tee -a "$log"; }
    # every JSON line a check prints goes to results.jsonl as well
    rows() { tee -a "$log" | grep --line-buffered '^{' >>"$jsonl"; }
    [[ -d "$BUNDLE" ]] || { echo "no gpu-bundle/: run 'tools/gpu_check.sh build' first and carry gpu-bundle" >&2; exit 1; }
    for f in "$BUNDLE"/*.xz; do
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$f" "$bin/$(basename "$f" .xz)"
        chmod +x "$bin/$(basename "$f" .xz)"
    done
    # The binaries link libcudart/libcublas/libcurand .so.13 without a RUNPATH: take them from PyTorch's CUDA 13
    # wheels (and libcuda.so.1 from the driver).
    local libs
    libs="$(python3 -c 'import os, nvidia.cu13 as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null ||
        dirname "$(find /opt /usr /root /home -name 'libcublas.so.13' -print -quit 2>/dev/null)")"
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    say "machine"
    { nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'; } 2>&1 | tee -a "$log"

    say "0. dinov2-flash-attn tests"
    "$bin/flash_attn_tests" --test-threads 1 --nocapture 2>&1 | tee -a "$log"
    say "a, b, d. correctness and packing"
    "$bin/gpu_check" --device cuda --sections a,b,d 2>&1 | rows
    say "c. throughput, ours and timm interleaved"
    local r
    for ((r = 0; r < ${GPU_CHECK_ROUNDS:-2}; r++)); do
        "$bin/gpu_check" --device cuda --sections c --rounds 1 2>&1 | sed "s/\"round\": 0/\"round\": $r/" | rows
        PYTHONUNBUFFERED=1 python3 "$BUNDLE/gpu_bench_torch.py" --round "$r" 2>&1 | rows
    done
    say "e. training step and peak memory"
    local arch
    for arch in vit_small vit_base; do
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$bin/mem.txt" 2>/dev/null &
        local smi=$!
        "$bin/bench_step" --device cuda --dtype bf16 --arch "$arch" --batch 32 --global-size 224 --local-size 98 \
            --local-crops 8 --prototypes 65536 --drop-path 0.1 --threads 16 --warmup 2 --steps 5 2>&1 |
            sed "s/^{/{\"section\": \"e\", \"arch\": \"$arch\", \"batch\": 32, \"dtype\": \"bf16\", /" | rows
        kill "$smi" 2>/dev/null
        wait "$smi" 2>/dev/null
        local peak
        peak="$(sort -n "$bin/mem.txt" 2>/dev/null | tail -n 1)"
        echo "{\"section\": \"e\", \"arch\": \"$arch\", \"peak_gpu_memory_mib\": ${peak:-null}}" | rows
    done
    say "done"
}

case "$cmd" in
    build) build ;;
    run) run ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
