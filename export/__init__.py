"""Converters and quantizers: HF -> GGUF through llama.cpp's own converter and quantizer
(`export.gguf`, with the Ollama Modelfile in `export.ollama`), and HF -> ONNX through optimum +
onnxruntime (`export.onnx`). Headless: never imports Textual; heavy libraries load inside functions.

The version-locked llama.cpp converter is installed by scripts/setup.sh and located with
`appliance.stack.converter_dir()`. The pipeline that turns a run into checked artifacts (merge,
export, parity gate, registry) is `appliance.stages.export.pipeline`.
"""
