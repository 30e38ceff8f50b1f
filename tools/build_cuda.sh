#!/usr/bin/env bash
# Builds dinov2-rs with CUDA on a machine without a CUDA toolkit or GPU: nvcc, headers and libraries come from
# NVIDIA's PyPI wheels (CUDA 13.0), CUTLASS headers from the `nvidia-cutlass` wheel, and libcuda from a stub built
# here (the driver's real libcuda.so.1 satisfies it on the GPU machine). Only package registries are reached.
# Everything is kept under $DINOV2_CUDA_ROOT and reused by later runs. docs/cuda.md has the steps, times and sizes.
#
#   tools/build_cuda.sh setup                       # the toolkit only (about 1-3 minutes plus ~700 MB of downloads)
#   tools/build_cuda.sh env                         # print the exports, for `eval "$(tools/build_cuda.sh env)"`
#   tools/build_cuda.sh build [cargo build args]    # setup, then `cargo build --release --locked <args>`
#   tools/build_cuda.sh cargo <subcommand> [args]   # setup, then any cargo command in that environment
#
# e.g. tools/build_cuda.sh build --features flash-attn --example gpu_check
#
# Environment: DINOV2_CUDA_ROOT (default target/cuda-toolkit), CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for
# A100), CARGO_TARGET_DIR (default target/cuda), PYTHON (default python3), CUDAFORGE_THREADS (default: all cores).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CUDA_ROOT="${DINOV2_CUDA_ROOT:-$ROOT/target/cuda-toolkit}"
PYTHON="${PYTHON:-python3}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

# CUDA 13.0 exactly: nvcc 13.0 writes PTX ISA 9.0, which a CUDA 13.0 driver (580.x) can JIT; a newer nvcc's PTX
# would be refused by that driver. The runtime libraries are matched at run time by SONAME (libcublas.so.13, ...).
WHEELS=(
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
)
# The CUTLASS commit candle-flash-attn 0.11.1 pins; cudaforge uses a cached checkout of it when one exists. Its
# headers come from the 3.5.0 wheel (the pinned commit is of the 3.5 era; all of flash-attn's sm80 kernels build
# against them).
CUTLASS_WHEEL=nvidia-cutlass==3.5.0.0
CUTLASS_COMMIT=7d49e6c7e2f8896c47f586706e67e1fb215529dc

VENV="$CUDA_ROOT/venv"
CUDA_DIR="$CUDA_ROOT/cuda"
CUTLASS_DIR="$CUDA_ROOT/cudaforge/git/checkouts/cutlass-${CUTLASS_COMMIT:0:16}"

log() { printf '[build_cuda] %s\n' "$*" >&2; }

setup_wheels() {
    local stamp="$VENV/.dinov2-wheels" want="${WHEELS[*]}"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    log "installing the CUDA 13.0 wheels into $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${WHEELS[@]}"
    echo "$want" >"$stamp"
}

site_cu13() {
    "$VENV/bin/python" -c 'import os, nvidia.cu13 as m; print(os.path.realpath(list(m.__path__)[0]))'
}

# The cargo registry's copy of cudarc's driver bindings: every `cu*` entry point gets an empty stub.
cudarc_driver_bindings() {
    local ver
    ver="$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock")"
    [[ -n "$ver" ]] || { log "cudarc is not in Cargo.lock"; exit 1; }
    (cd "$ROOT" && cargo fetch --locked >/dev/null 2>&1) || true
    local f
    for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$ver"/src/driver/sys/mod.rs; do
        [[ -f "$f" ]] && { echo "$f"; return; }
    done
    log "cudarc $ver's sources are not in the cargo registry (cargo fetch failed?)"
    exit 1
}

setup_toolkit() {
    local cu13 stamp="$CUDA_DIR/.dinov2-toolkit"
    cu13="$(site_cu13)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$cu13" && -f "$CUDA_DIR/lib64/stubs/libcuda.so" ]]; then return; fi
    log "assembling a CUDA_HOME at $CUDA_DIR"
    rm -rf "$CUDA_DIR"
    mkdir -p "$CUDA_DIR/lib64/stubs"
    ln -s "$cu13/bin" "$CUDA_DIR/bin"
    ln -s "$cu13/include" "$CUDA_DIR/include"
    ln -s "$cu13/nvvm" "$CUDA_DIR/nvvm"
    local lib base
    for lib in "$cu13"/lib/lib*.so.*; do
        base="$(basename "$lib")"
        ln -s "$lib" "$CUDA_DIR/lib64/$base"
        ln -sf "$lib" "$CUDA_DIR/lib64/${base%%.so.*}.so"
    done
    # libcuda: no wheel ships it, not even as a stub. The SONAME is what the binary records (NEEDED libcuda.so.1).
    local bindings
    bindings="$(cudarc_driver_bindings)"
    grep -oE 'fn cu[A-Za-z0-9_]+' "$bindings" | sed 's/^fn //' | sort -u |
        awk '{ printf "void %s(void) {}\n", $1 }' >"$CUDA_DIR/lib64/stubs/libcuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_DIR/lib64/stubs/libcuda.so" \
        "$CUDA_DIR/lib64/stubs/libcuda_stub.c"
    echo "$cu13" >"$stamp"
}

setup_cutlass() {
    if [[ -d "$CUTLASS_DIR/include/cute" && -f "$CUTLASS_DIR/.git/HEAD" ]]; then return; fi
    log "unpacking CUTLASS headers ($CUTLASS_WHEEL) into $CUTLASS_DIR"
    local tmp
    tmp="$(mktemp -d)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "$CUTLASS_WHEEL" -d "$tmp"
    (cd "$tmp" && "$VENV/bin/python" -m zipfile -e ./*.whl unpacked)
    rm -rf "$CUTLASS_DIR"
    mkdir -p "$CUTLASS_DIR/tools/util" "$CUTLASS_DIR/.git/objects" "$CUTLASS_DIR/.git/refs"
    cp -r "$tmp/unpacked/cutlass_library/source/include" "$CUTLASS_DIR/include"
    cp -r "$tmp/unpacked/cutlass_library/source/tools/util/include" "$CUTLASS_DIR/tools/util/include"
    # cudaforge takes a checkout as cached when `git rev-parse HEAD` inside it prints the pinned commit.
    echo "$CUTLASS_COMMIT" >"$CUTLASS_DIR/.git/HEAD"
    rm -rf "$tmp"
}

print_env() {
    cat <<EOF
export CUDA_HOME="$CUDA_DIR"
export CUDA_PATH="$CUDA_DIR"
export PATH="$CUDA_DIR/bin:\$PATH"
export CUDA_COMPUTE_CAP="$COMPUTE_CAP"
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_HOME="$CUDA_ROOT/cudaforge"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export DINOV2_CUTLASS_DIR="$CUTLASS_DIR"
export DINOV2_FLASH_ATTN_BUILD_DIR="$CUDA_ROOT/flash-attn-build"
export CANDLE_FLASH_ATTN_BUILD_DIR="$CUDA_ROOT/candle-flash-attn-build"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
EOF
}

setup() {
    mkdir -p "$CUDA_ROOT" "$CUDA_ROOT/flash-attn-build" "$CUDA_ROOT/candle-flash-attn-build"
    setup_wheels
    setup_toolkit
    setup_cutlass
    "$CUDA_DIR/bin/nvcc" --version | tail -n 2 >&2
}

cmd="${1:-build}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
    setup) setup ;;
    env) setup >/dev/null; print_env ;;
    build)
        setup
        eval "$(print_env)"
        cd "$ROOT"
        log "cargo build --release --locked $* (CARGO_TARGET_DIR=$CARGO_TARGET_DIR, sm_$CUDA_COMPUTE_CAP)"
        exec cargo build --release --locked "$@"
        ;;
    cargo)
        setup
        eval "$(print_env)"
        cd "$ROOT"
        exec cargo "$@"
        ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
esac
