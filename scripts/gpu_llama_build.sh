#!/usr/bin/env bash
# Build llama.cpp with its CUDA backend from the llama-cpp-python sdist's own sources (so the runtime,
# the converter and llama-bench are one version), for the given CUDA architectures (75 = T4, 90 =
# H100/H200). Out: DIR/bin (libllama.so, libggml*.so, llama-bench, llama-quantize). Used on a GPU
# host with nvcc and cmake; the appliance loads that libllama through LLAMA_CPP_LIB_PATH.
#   scripts/gpu_llama_build.sh SRC_DIR OUT_DIR [ARCHS]
set -euo pipefail
SRC=$1; OUT=$2; ARCHS=${3:-75;90}
cmake -S "$SRC/vendor/llama.cpp" -B "$OUT" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$OUT/bin" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$OUT/bin" > "$OUT.configure.log" 2>&1 \
  || { tail -40 "$OUT.configure.log"; exit 1; }
cmake --build "$OUT" -j"$(nproc)" --target llama ggml llama-bench llama-quantize > "$OUT.build.log" 2>&1 \
  || { grep -m20 -i error "$OUT.build.log"; tail -20 "$OUT.build.log"; exit 1; }
ls "$OUT/bin"
