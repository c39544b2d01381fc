"""Converters and quantizers: HF -> GGUF through llama.cpp's own converter and quantizer, and
HF -> ONNX through optimum + onnxruntime. Headless: never imports Textual.

The version-locked llama.cpp converter is installed by scripts/setup.sh and located with
`appliance.stack.converter_dir()`. The export stages themselves land with the export issue.
"""
