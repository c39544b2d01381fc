#!/usr/bin/env bash
# On the lent GPU host, over the folders bench/onnx_gpu_carry.py packs (it copies this file to
# .gpuA/go.sh): issue 16's ONNX rows (8B and 0.5B, fp16 and int4-cuda) and the GPU test of
# int4-cuda on the real SmolLM2. One call per stage, back to back (files live while warm):
#   init [small]  carry .gpuA: install, start the exports as a job that outlives the call
#   part          carry .gpuB, .gpuC, .gpuD: parts of the CUDA provider
#   finish        carry .gpuE: the provider in place, each export benched as soon as it exists
#   smol          carry .gpuF: SmolLM2 as int4-cuda, then tests/gpu/test_onnx_gpu.py on it
S=/tmp/site; W=/tmp/og
export PYTHONPATH=$S:/tmp/repo PYTHONUNBUFFERED=1
status() { echo "--- prep log:"; grep -v "builder: layer" /tmp/prep.log 2>/dev/null | tail -n ${1:-6}; df -h /tmp | tail -1; free -g | sed -n 2p; ls $W 2>/dev/null | tr '\n' ' '; echo; }
case $1 in
init)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $S .gpuA/*.whl || exit 1
  ln -sfn /opt/torch/.venv/lib/python3.12/site-packages/nvidia $S/nvidia; ls $S/nvidia/ | head -3
  rm -rf /tmp/repo && mkdir -p /tmp/repo && cp -r appliance export tui bench tests pyproject.toml /tmp/repo/
  cd /tmp/repo
  python3 -c "import onnxruntime as o, transformers as t, onnxruntime_genai as g; print(o.__version__, o.__file__, t.__version__, g.__version__)"
  BIG="python3 bench/onnx_gpu.py prepare --shapes 8b --precisions int4-cuda,fp16 --work $W &&"; [ "$2" = small ] && BIG=""
  setsid nohup bash -c "$BIG python3 bench/onnx_gpu.py prepare --shapes 0.5b --precisions int4-cuda,fp16 --work $W; echo PREP-EXIT \$?" > /tmp/prep.log 2>&1 < /dev/null &
  sleep 20; status 20 ;;
part)
  ls -la .gpu*/ | grep -v '^total'; status ;;
finish)
  cat .gpu*/cuda.xz.* > /tmp/cuda.xz && ls -la /tmp/cuda.xz
  python3 -c "import lzma,shutil; shutil.copyfileobj(lzma.open('/tmp/cuda.xz'), open('$S/onnxruntime/capi/libonnxruntime_providers_cuda.so','wb'))" || exit 1
  sha256sum $S/onnxruntime/capi/libonnxruntime_providers_cuda.so; cat .gpuA/cuda.sha256; rm -f /tmp/cuda.xz
  cd /tmp/repo
  python3 -c "import onnxruntime as o; print(o.get_available_providers())"
  waitfor() { for i in $(seq 1 $2); do [ -f $W/$1/model.onnx ] && return 0; grep -q PREP-EXIT /tmp/prep.log && return 1; sleep 10; done; return 1; }
  for p in int4-cuda fp16; do
    waitfor 8b-$p ${2:-40} && python3 bench/onnx_gpu.py bench --shapes 8b --precisions $p --work $W --out $OUT/run-f-8b-$p.json 2>&1 | tail -3
    status 6; cp /tmp/prep.log $OUT/prep.log
  done
  waitfor 0.5b-fp16 6 && python3 bench/onnx_gpu.py bench --shapes 0.5b --precisions fp16,int4-cuda --work $W --out $OUT/run-f-0.5b.json 2>&1 | tail -5
  status 4 ;;
smol)
  mkdir -p /tmp/smol && cat .gpu*/gguf.part* > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
  sha256sum /tmp/smol/*.gguf; cat .gpuA/gguf.sha256
  rm -rf /tmp/gguf-py; cp -r .gpuF/gguf-py /tmp/gguf-py; export PYTHONPATH=$S:/tmp/repo:/tmp/gguf-py
  cd /tmp/repo
  python3 bench/onnx_gpu.py smollm2 --gguf /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf --out /tmp/smol-int4 --work /tmp/smolw --precision int4-cuda 2>&1 | tail -3
  APPLIANCE_GPU_TEST_ONNX=/tmp/smol-int4 timeout 300 python3 -m pytest tests/gpu/test_onnx_gpu.py -v -s -rs -p no:cacheprovider 2>&1 | tee $OUT/onnx-gpu-tests-int4-cuda.txt | tail -20 ;;
esac
