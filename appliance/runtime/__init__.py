"""The offline runtime: chat engines over exported artifacts, the console chat and the HTTP server.

Torch-free by design: a served GGUF needs llama-cpp-python, an ONNX artifact onnxruntime, numpy and
tokenizers; neither pulls in torch or transformers, so a server starts fast and stays small.
"""

DEFAULT_PORT = 8321  # the API server's; here so the CLI, the units and the TUI import nothing heavy
