#!/usr/bin/env bash
# llama.cpp as the peer, measured in the same run as our fast decoder, on the same GPU (issue 21).
#
#   bench/peer_llamacpp.sh prep          # HERE (network): fetch llama.cpp, strip it, write .peer/llama.cpp.tar.xz
#   bench/peer_llamacpp.sh all [OUT]     # DEVICE: build, write + convert the model, bench both, one table
#                                        # (the build runs in the background while the model is written)
#
# The steps of `all`, each callable on its own:
#   build [cpu]     unpack .peer/llama.cpp.tar.xz into $PEER_WORK and build llama-bench and
#                   llama-batched-bench (CUDA; `cpu`: CPU only, to prove the pipeline without a GPU)
#   build-bg [cpu]  the same in its own process session (setsid), returning at once; `wait` waits for it
#   model           write the random $PEER_LAYERS-layer GPT-OSS-20B-shaped slice as an official-layout MXFP4
#                   checkpoint, with a 201,088-token tokenizer and an attention-only LoRA, and convert both
#                   with llama.cpp's own converters (bench/peer_model.py, bench/peer_convert.py)
#   bench [OUT]     llama-bench tg/pp, llama-batched-bench with and without --lora, and ours over the same
#                   checkpoint (bench/peer_ours.py); prints one table (bench/peer_table.py)
#
# llama.cpp's source is the one vendored in the `llama-cpp-python` sdist (PyPI), never committed here.
# Knobs (environment): PEER_LAYERS (24), PEER_WORK (/tmp/peer), PEER_JOBS (nproc), PEER_ARCHS (CUDA
# architectures; default: the present GPU's, e.g. 90 on an H100; "86;90" covers an RTX 3090 too),
# PEER_TG (128), PEER_PP (512,8192), PEER_REPS (3), PEER_CAP_GB (24: ours is capped as a 24 GB card),
# PEER_OURS (1; 0: llama.cpp alone), PEER_BUILD (cuda; cpu for `all` without a GPU), PYTHON (python3),
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
    # Only what the build of llama-bench/llama-batched-bench and the HF->GGUF converters need.
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
    cp -r "$src"/tools/{llama-bench,batched-bench} "$keep/tools/"
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\nadd_subdirectory(batched-bench)\n' \
        > "$keep/tools/CMakeLists.txt"
    find "$keep" \( -name '*.md' -o -name tests -o -name '__pycache__' \) -prune -exec rm -rf {} +
    echo "llama-cpp-python $VERSION (vendor/llama.cpp), stripped by bench/peer_llamacpp.sh prep" > "$keep/PEER_SOURCE"
    mkdir -p "$(dirname "$PACK")"
    tar -C "$tmp" -cf - llama.cpp | xz -9 -T2 > "$PACK.part"
    mv "$PACK.part" "$PACK"
    rm -rf "$tmp"
    log "wrote $PACK ($(du -h "$PACK" | cut -f1))"
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
        flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$archs")
        log "CUDA architectures: $archs"
    fi
    local t0=$SECONDS generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$SRC" -B "$SRC/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${flags[@]}" \
        -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_SUBPROCESS=OFF -DBUILD_SHARED_LIBS=OFF >"$WORK/build.log" 2>&1
    cmake --build "$SRC/build" -j "$JOBS" --target llama-bench llama-batched-bench >>"$WORK/build.log" 2>&1
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
    "$PY" "$ROOT/bench/peer_model.py" "$WORK/hf" --layers "$LAYERS"
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
    ctx=$((max_pp + TG))
    log "llama-bench -p $PP -n $TG -r $REPS"
    "$bin/llama-bench" -m "$WORK/model.gguf" -p "$PP" -n "$TG" -r "$REPS" -o json >"$out/llama-bench.json" \
        2>"$out/llama-bench.log" || { tail -n 30 "$out/llama-bench.log"; die "llama-bench failed"; }
    for lora in "" "--lora $WORK/lora.gguf"; do
        local name=batched${lora:+-lora}
        log "llama-batched-bench -npp $PP -ntg $TG ${lora:+(with --lora)}"
        # shellcheck disable=SC2086  # $lora: the flag and its file, or nothing
        "$bin/llama-batched-bench" -m "$WORK/model.gguf" -c "$ctx" -b 2048 -ub 512 -npp "$PP" -ntg "$TG" -npl 1 \
            -ngl 999 $lora --output-format jsonl >"$out/$name.jsonl" 2>"$out/$name.log" \
            || { tail -n 30 "$out/$name.log"; die "llama-batched-bench failed"; }
    done
    if [ "${PEER_OURS:-1}" != 0 ]; then
        log "ours: bench/peer_ours.py --tg $TG --pp $PP --reps $REPS"
        "$PY" "$ROOT/bench/peer_ours.py" "$WORK/hf/model" "$WORK/hf/lora" "$out/ours.json" --tg "$TG" --pp "$PP" \
            --reps "$REPS" --cap-gb "${PEER_CAP_GB:-24}" 2>&1 | grep -v Warning || true
        [ -f "$out/ours.json" ] || die "bench/peer_ours.py wrote no $out/ours.json"
    fi
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

main "$@"
