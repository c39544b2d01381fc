"""Converters and quantizers: HF -> GGUF through llama.cpp's own converter and quantizer
(`export.gguf`, with the Ollama Modelfile in `export.ollama`), and HF -> ONNX through optimum +
onnxruntime (`export.onnx`). Headless: never imports Textual; heavy libraries load inside functions.

The version-locked llama.cpp converter is installed by scripts/setup.sh and located with
`appliance.stack.converter_dir()`. What turns a run into checked artifacts is the stages: the merge
(`appliance.stages.merge`), the conversions with their registry entries
(`appliance.stages.export.convert`) and the parity gate (`appliance.stages.verify`).
"""
