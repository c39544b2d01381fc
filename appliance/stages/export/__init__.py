"""The export stage: a run merged, converted and quantized, each artifact parity-gated.

Its request (`ExportRequest`) is what the CLI, the TUI and the demo build; the pipeline itself is
still `appliance/stages/export/pipeline.py` (to move here), the file formats are `export/` (GGUF, ONNX,
Modelfile).
"""

from appliance.stages.export.request import (
    DEFAULT_TYPES,
    FORMATS,
    GGUF_OFFERED,
    ONNX_PRECISIONS,
    ExportRequest,
)

__all__ = ["DEFAULT_TYPES", "FORMATS", "GGUF_OFFERED", "ONNX_PRECISIONS", "ExportRequest"]
