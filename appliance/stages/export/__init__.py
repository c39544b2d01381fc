"""The export stage: a run merged, converted and quantized, each artifact parity-gated.

- `convert`: `export_gguf` / `export_onnx`, the artifacts' names, made or reused one by one (the
  merged model from the merge stage, each artifact gated by the verify stage's `gate`);
- `job`: its job function `job.run` (kind `export`);
- `request`: its request (`ExportRequest`), what the CLI, the TUI and the demo build.
The file formats themselves are `export/` (GGUF, ONNX, Modelfile).
"""

from appliance.stages.export.request import (
    DEFAULT_TYPES,
    FORMATS,
    GGUF_OFFERED,
    ONNX_PRECISIONS,
    ExportRequest,
)

__all__ = ["DEFAULT_TYPES", "FORMATS", "GGUF_OFFERED", "ONNX_PRECISIONS", "ExportRequest"]
