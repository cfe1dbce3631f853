#!/usr/bin/env bash
# llama.cpp as the peer, measured in the same run as our fast decoder, on the same GPU (issue 21).
#
#   bench/peer_llamacpp.sh prep          # HERE (network): fetch llama.cpp, strip it, write .peer/llama.cpp.tar.xz
#   bench/peer_llamacpp.sh all [OUT]     # DEVICE: build, write + convert the model, bench both, one table
#                                        # (the build runs in the background while the model is written)
#
# The steps of `all`, each callable on its own:
#   build [cpu]     unpack .peer/llama.cpp.tar.xz into $PEER_WORK and build llama-bench and
#                   llama-completion (CUDA; `cpu`: CPU only, to prove the pipeline without a GPU)
#   build-bg [cpu]  the same in its own process session (setsid), returning at once; `wait` waits for it
#   model           write the random $PEER_LAYERS-layer GPT-OSS-20B-shaped slice as an official-layout MXFP4
#                   checkpoint, with a 201,088-token tokenizer and an attention-only LoRA, and convert both
#                   with llama.cpp's own converters (bench/peer_model.py, bench/peer_convert.py)
#   bench [OUT]     llama-bench tg/pp; llama-completion without and with --lora (llama-bench takes no
#                   LoRA); ours over the same checkpoint (bench/peer_ours.py); one table (bench/peer_table.py)
#
# llama.cpp's source is the one vendored in the `llama-cpp-python` sdist (PyPI), never committed here.
# Knobs (environment): PEER_LAYERS (24), PEER_WORK (/tmp/peer), PEER_JOBS (nproc), PEER_ARCHS (CUDA
# architectures; default: the present GPU's, e.g. 90 on an H100; "86;90" covers an RTX 3090 too),
# PEER_TG (128), PEER_PP (512,8192), PEER_REPS (3), PEER_CAP_GB (24: ours is capped as a 24 GB card),
# PEER_OURS (1; 0: llama.cpp alone), PEER_BUILD (cuda; cpu for `all` without a GPU), PYTHON (python3),
# PEER_CMAKE_ARGS (more CMake arguments, split on spaces),
# PEER_VERSION (the llama-cpp-python sdist prep fetches; 0.3.36).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PACK=$ROOT/.peer/llama.cpp.tar.xz
WORK=${PEER_WORK:-/tmp/peer}
SRC=$WORK/llama.cpp
LAYERS=${PEER_LAYERS:-24}
JOBS=${PEER_JOBS:-$(nproc)}
TG=${PEER_TG:-128}
PP=${PEER_PP:-512,8192}
REPS=${PEER_REPS:-3}
VERSION=${PEER_VERSION:-0.3.36}
PY=${PYTHON:-python3}

die() { echo "peer_llamacpp: $*" >&2; exit 1; }
log() { echo "[peer $(date +%H:%M:%S)] $*" >&2; }

prep() {
    # Only what the build of llama-bench/llama-completion and the HF->GGUF converters need.
    local tmp
    tmp=$(mktemp -d)
    "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$tmp"
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    local src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" keep="$tmp/llama.cpp"
    [ -f "$src/CMakeLists.txt" ] || die "no vendor/llama.cpp in llama-cpp-python $VERSION"
    mkdir -p "$keep/tools" "$keep/ggml/src"
    cp -r "$src"/{CMakeLists.txt,cmake,LICENSE,include,src,common,vendor,conversion,gguf-py} "$keep/"
    cp "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$keep/"
    cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$keep/ggml/"
    # ggml: the core, the CPU backend (always built) and CUDA; the others are configured only when on
    find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$keep/ggml/src/" \;
    cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$keep/ggml/src/"
    cp -r "$src"/tools/{llama-bench,completion} "$keep/tools/"
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\nadd_subdirectory(completion)\n' \
        > "$keep/tools/CMakeLists.txt"
    find "$keep" \( -name '*.md' -o -name tests -o -name '__pycache__' \) -prune -exec rm -rf {} +
    echo "llama-cpp-python $VERSION (vendor/llama.cpp), stripped by bench/peer_llamacpp.sh prep" > "$keep/PEER_SOURCE"
    mkdir -p "$(dirname "$PACK")"
    tar -C "$tmp" -cf - llama.cpp | xz -9 -T2 > "$PACK.part"
    mv "$PACK.part" "$PACK"
    rm -rf "$tmp"
    log "wrote $PACK ($(du -h "$PACK" | cut -f1))"
}

cuda_hints() {
    # Where the CUDA toolkit is assembled from pip wheels (this image's is), cuBLAS and the driver library
    # may live outside it: cuBLAS in torch's nvidia-cublas wheel (only libcublas.so.13, which CMake does
    # not look for), libcuda.so.1 with the driver. Print the CMake arguments that point at them.
    local nvcc_dir inc lib extra=$WORK/cuda-extra
    nvcc_dir=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    [ -n "$nvcc_dir" ] || die "nvcc not found (CUDA's compiler): build cpu, or put it on PATH"
    if ! ls "$nvcc_dir"/include/cublas_v2.h "$nvcc_dir"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
        inc=$("$PY" -c 'import nvidia, pathlib; print(*[p.parent for d in nvidia.__path__
                        for p in pathlib.Path(d).glob("*/include/cublas_v2.h")][:1])' 2>/dev/null || true)
        [ -n "$inc" ] || die "cuBLAS not found: neither in the CUDA toolkit nor in an nvidia-cublas wheel"
        lib=$inc/../lib
        rm -rf "$extra" && mkdir -p "$extra/include" "$extra/lib"
        ln -s "$inc"/cublas*.h "$extra/include/"
        for so in "$lib"/libcublas.so.* "$lib"/libcublasLt.so.*; do
            ln -s "$so" "$extra/lib/"
            ln -sf "$so" "$extra/lib/$(basename "$so" | sed 's/\.so\..*/.so/')"
        done
        echo "-DCUDA_cublas_LIBRARY=$extra/lib/libcublas.so" "-DCUDA_cublasLt_LIBRARY=$extra/lib/libcublasLt.so" \
             "-DCMAKE_CUDA_FLAGS=-I$extra/include"
    fi
    if ! ls "$nvcc_dir"/lib64/libcuda.so "$nvcc_dir"/lib64/stubs/libcuda.so >/dev/null 2>&1; then
        lib=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
        [ -n "$lib" ] || lib=$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 \
                                  2>/dev/null | head -n 1)
        if [ -n "$lib" ]; then
            echo "-DCUDA_cuda_driver_LIBRARY=$lib"
        else  # no driver library to link: ggml's legacy memory pool instead of its VMM one
            log "libcuda.so not found: building with GGML_CUDA_NO_VMM=ON"
            echo "-DGGML_CUDA_NO_VMM=ON"
        fi
    fi
}

build() {
    # Release build of the two bench tools only. CUDA: the present GPU's architecture unless PEER_ARCHS
    # names others (each one more is another pass of nvcc over every kernel).
    local mode=${1:-cuda} flags=()
    [ -f "$PACK" ] || die "$PACK is missing: run '$0 prep' where the network is"
    rm -rf "$SRC" "$WORK/build.done" "$WORK/build.failed"
    mkdir -p "$WORK"
    tar -xJf "$PACK" -C "$WORK"
    if [ "$mode" = cpu ]; then
        flags=(-DGGML_CUDA=OFF)
    else
        local archs=${PEER_ARCHS:-}
        if [ -z "$archs" ]; then
            archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
        fi
        [ -n "$archs" ] || die "no GPU found: set PEER_ARCHS, or build cpu"
        local hints
        hints=$(cuda_hints)
        # shellcheck disable=SC2206  # the hints hold no spaces inside one argument
        flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$archs" $hints)
        log "CUDA architectures: $archs"
    fi
    local t0=$SECONDS generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$SRC" -B "$SRC/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_SUBPROCESS=OFF -DBUILD_SHARED_LIBS=OFF ${PEER_CMAKE_ARGS:-} >"$WORK/build.log" 2>&1
    cmake --build "$SRC/build" -j "$JOBS" --target llama-bench llama-completion >>"$WORK/build.log" 2>&1
    echo "$((SECONDS - t0))" > "$WORK/build.done"
    log "built $mode in $((SECONDS - t0)) s: $SRC/build/bin"
}

build_bg() {
    # The build in its own process session, so it outlives the command that starts it and other GPU work
    # runs meanwhile; `wait` blocks until it is done and fails if it failed.
    mkdir -p "$WORK"
    rm -f "$WORK/build.done" "$WORK/build.failed"
    setsid bash -c '"$0" build "$1" || touch "$2/build.failed"' "$0" "${1:-cuda}" "$WORK" \
        >"$WORK/build.bg.log" 2>&1 < /dev/null &
    log "build started in the background (log: $WORK/build.log)"
}

wait_build() {
    while [ ! -f "$WORK/build.done" ]; do
        if [ -f "$WORK/build.failed" ]; then
            tail -n 40 "$WORK/build.log" >&2
            die "the build failed (log: $WORK/build.log)"
        fi
        sleep 2
    done
    log "build done in $(cat "$WORK/build.done") s"
}

model() {
    # The checkpoint (GPU when there is one) and both conversions with llama.cpp's own converters.
    [ -f "$SRC/convert_hf_to_gguf.py" ] || tar -xJf "$PACK" -C "$WORK"
    local t0=$SECONDS
    rm -rf "$WORK/hf"
    "$PY" "$ROOT/bench/peer_model.py" "$WORK/hf" --layers "$LAYERS" --prompts "$PP"
    log "checkpoint written in $((SECONDS - t0)) s"
    "$PY" "$ROOT/bench/peer_convert.py" "$SRC" convert_hf_to_gguf.py "$WORK/hf/model" \
        --outfile "$WORK/model.gguf" >"$WORK/convert.log" 2>&1 || { tail -n 30 "$WORK/convert.log"; exit 1; }
    "$PY" "$ROOT/bench/peer_convert.py" "$SRC" convert_lora_to_gguf.py "$WORK/hf/lora" --base "$WORK/hf/model" \
        --outfile "$WORK/lora.gguf" >>"$WORK/convert.log" 2>&1 || { tail -n 30 "$WORK/convert.log"; exit 1; }
    log "converted in $((SECONDS - t0)) s total: $(du -h "$WORK/model.gguf" | cut -f1) model, $(du -h "$WORK/lora.gguf" | cut -f1) LoRA"
}

bench() {
    # llama.cpp first (its own process, then gone), then ours; all on GPU 0 of this machine.
    local out=${1:-$WORK/out} bin=$SRC/build/bin max_pp ctx
    mkdir -p "$out"
    [ -x "$bin/llama-bench" ] || die "no $bin/llama-bench: build first"
    [ -f "$WORK/model.gguf" ] || die "no $WORK/model.gguf: run '$0 model' first"
    max_pp=$(tr ',' '\n' <<<"$PP" | sort -n | tail -1)
    ctx=$((max_pp + TG + 16))
    log "llama-bench -p $PP -n $TG -r $REPS"
    "$bin/llama-bench" -m "$WORK/model.gguf" -p "$PP" -n "$TG" -r "$REPS" -ngl 99 -o json >"$out/llama-bench.json" \
        2>"$out/llama-bench.log" || { tail -n 30 "$out/llama-bench.log"; die "llama-bench failed"; }
    # llama-bench takes no LoRA: llama-completion does, and prints its prompt and generation timings.
    # Without and with the LoRA, one run per prompt length, TG tokens generated after each prompt.
    for lora in "" "$WORK/lora.gguf"; do
        for n in ${PP//,/ }; do
            local name=completion${lora:+-lora}-$n
            log "llama-completion, a $n-token prompt + $TG tokens${lora:+, with --lora}"
            "$bin/llama-completion" -m "$WORK/model.gguf" -f "$WORK/hf/prompt-$n.txt" -n $((TG + 1)) -c "$ctx" \
                -ngl 999 -no-cnv --ignore-eos --temp 0 ${lora:+--lora "$lora"} </dev/null >/dev/null 2>"$out/$name.log" \
                || { tail -n 30 "$out/$name.log"; die "llama-completion failed"; }
        done
    done
    if [ "${PEER_OURS:-1}" != 0 ]; then
        log "ours: bench/peer_ours.py --tg $TG --pp $PP --reps $REPS"
        "$PY" "$ROOT/bench/peer_ours.py" "$WORK/hf/model" "$WORK/hf/lora" "$out/ours.json" --tg "$TG" --pp "$PP" \
            --reps "$REPS" --cap-gb "${PEER_CAP_GB:-24}" 2>&1 | grep -v Warning || true
        [ -f "$out/ours.json" ] || die "bench/peer_ours.py wrote no $out/ours.json"
    fi
    cp "$SRC/PEER_SOURCE" "$out/"
    "$PY" "$ROOT/bench/peer_table.py" "$out" | tee "$out/table.md"
}

all() {
    build_bg "${PEER_BUILD:-cuda}"
    model
    wait_build
    bench "${1:-}"
}

main() {
    local cmd=${1:-}
    shift || true
    case "$cmd" in
        prep) prep ;;
        build) build "$@" ;;
        build-bg) build_bg "$@" ;;
        wait) wait_build ;;
        model) model ;;
        bench) bench "$@" ;;
        all) all "$@" ;;
        *) die "usage: $0 prep|build [cpu]|build-bg [cpu]|wait|model|bench [OUT]|all [OUT]" ;;
    esac
}

main "$@"; exit  # exit on the same line: an edit of this file during a run is never read
