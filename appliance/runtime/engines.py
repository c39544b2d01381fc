"""Which artifact a name or path means, and the engine that runs it.

Kept apart from `runtime/engine.py` (the engine contract both backends implement): this factory
imports the backends, which import that contract, so the two in one module made an import cycle.
An export of the workspace is opened only if it passed its parity gate (or the operator
overrides it), and only in a safe format (GGUF or an ONNX folder). A model of the workspace that
was imported from a GGUF (a serve-only model of the edge profile, or a GGUF dequantized for
training on the full one) is opened by its name too: its `gguf/` copy is the file it came as, a
ready inference artifact with nothing to gate. An export name wins over a model of the same name.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from appliance import manifest
from appliance.errors import ApplianceError, NotFoundError, RefusedError, ValidationError
from appliance.runtime.engine import Artifact, ChatEngine, Delta, Done, Sampling
from appliance.workspace import ArtifactRecord, Workspace, require_passed

# What a front end needs to chat: these and the engine contract's types it passes and reads.
__all__ = ["Artifact", "ChatEngine", "Delta", "Done", "Sampling", "open_engine", "resolve"]


def resolve(ref: str, ws: Workspace | None = None, *, allow_failed_parity: bool = False) -> Artifact:
    """An export name in the workspace, a model name whose model was imported from a GGUF, a .gguf
    file, an export folder or an ONNX folder -> the artifact to open. A workspace export that failed
    its parity gate is refused unless allowed; a merged (HF safetensors) export or model is refused
    with the commands that make a servable one."""
    path = Path(ref).expanduser()
    if path.exists():
        return _from_path(path.resolve(), allow_failed_parity)
    if os.sep in ref or ref.endswith(".gguf"):
        raise NotFoundError(f"{ref} does not exist",
                            hint="give an export name (appliance exports list), a .gguf file or an "
                                 "ONNX folder")
    return _from_workspace(ref, ws, allow_failed_parity)


def _from_workspace(name: str, ws: Workspace | None, allow: bool) -> Artifact:
    ws = ws or Workspace()
    try:
        record = ws.get("export", name)
    except (NotFoundError, ValidationError):
        pass
    else:
        return _from_export(record.path, allow)
    try:
        model = ws.get("model", name)
    except (NotFoundError, ValidationError):
        names = [r.name for r in ws.list("export")] if ws.root.exists() else []
        models = [r.name for r in ws.list("model")] if ws.root.exists() else []
        raise NotFoundError(f"no export named {name!r} (and no model of that name) in {ws.root}, "
                            "and no such file or folder",
                            hint="exports here: " + (", ".join(names) or "none (appliance export gguf RUN)")
                            + "; models here: " + (", ".join(models) or "none (appliance models import "
                                                   "--default)")
                            + "; or give a .gguf file or an ONNX folder") from None
    return _from_model(model.path)


def _from_model(folder: Path, data: dict[str, Any] | None = None) -> Artifact:
    """A workspace model imported from a GGUF -> its `gguf/` copy (manifest checked by file sizes);
    a model imported from an HF folder is refused with the commands that make a servable one."""
    data = data or manifest.verify(folder, full=False)
    info = data.get("info") or {}
    name = data.get("name", folder.name)
    rel = info.get("gguf_file")
    if not isinstance(rel, str) or not rel:
        raise RefusedError(f"model {name!r} is an HF safetensors model: the runtime serves GGUF and "
                           "ONNX artifacts",
                           hint="fine-tune it and export the run (appliance export gguf RUN), or "
                                "import a .gguf of it")
    path = folder / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.is_file():
        raise ApplianceError(f"model {name!r}: its GGUF ({rel}) is missing from {folder}",
                             title="Damaged model", hint="import it again")
    _check_model_template(name, path, info)
    return Artifact(name, "gguf", path, "unknown")


def _check_model_template(name: str, path: Path, info: dict[str, Any]) -> None:
    """The runtime renders the template the GGUF carries; a model imported with another one
    (--chat-template, full profile) would be served with a template it was not recorded with."""
    from appliance.runtime.template import gguf_metadata

    recorded = info.get("chat_template")
    if not isinstance(recorded, str) or not recorded:
        return
    carried = gguf_metadata(path, lambda k: k == "tokenizer.chat_template").get("tokenizer.chat_template")
    if isinstance(carried, str) and carried != recorded:
        raise RefusedError(f"model {name!r} was imported with another chat template than its GGUF "
                           "carries, and the runtime serves the GGUF's own",
                           hint="fine-tune it and export the run (appliance export gguf RUN), or "
                                "import the .gguf again without --chat-template")


def _from_path(path: Path, allow: bool) -> Artifact:
    if path.is_file():
        if path.suffix != ".gguf":
            raise RefusedError(f"{path} is not a .gguf file",
                               hint="the runtime opens GGUF files and ONNX folders (safe formats only)")
        if (path.parent / "manifest.json").is_file():
            return _from_export(path.parent, allow, gguf=path)
        return Artifact(path.stem, "gguf", path, "unknown")
    if (path / "manifest.json").is_file():
        return _from_export(path, allow)
    if (path / "model.onnx").is_file():
        if (path.parent / "manifest.json").is_file() and path.name == "onnx":
            return _from_export(path.parent, allow)
        return Artifact(path.name, "onnx", path, "unknown")
    if (path / "onnx" / "model.onnx").is_file():
        return Artifact(path.name, "onnx", path / "onnx", "unknown")
    return _loose_folder(path)


def _loose_folder(path: Path) -> Artifact:
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Artifact(ggufs[0].stem, "gguf", ggufs[0], "unknown")
    if ggufs:
        raise ValidationError(f"{path} holds {len(ggufs)} GGUF files",
                              hint="name one: " + ", ".join(p.name for p in ggufs))
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        raise _merged_refusal(str(path))
    raise ValidationError(f"{path} holds no GGUF file and no ONNX model",
                          hint="give a .gguf file, an ONNX folder (model.onnx) or an export name")


def _merged_refusal(what: str, run: str = "RUN") -> RefusedError:
    return RefusedError(f"{what} is an HF safetensors model (a merged export): the runtime serves "
                        "GGUF and ONNX artifacts",
                        hint=f"export it first: appliance export gguf {run} --quant Q4_K_M, or "
                             f"appliance export onnx {run} --precision int4")


def _from_export(folder: Path, allow: bool, gguf: Path | None = None) -> Artifact:
    """A workspace export folder (manifest checked by file sizes) -> its artifact, gated."""

    data = manifest.verify(folder, full=False)
    if data.get("kind") == "model" and gguf is None:  # a model folder named by its path
        return _from_model(folder, data)
    config, summary = data.get("config") or {}, (data.get("info") or {}).get("summary") or {}
    fmt = config.get("format")
    if fmt not in ("gguf", "onnx"):
        raise _merged_refusal(f"export {data.get('name', folder.name)!r}", config.get("run") or "RUN")
    record = ArtifactRecord("export", data.get("name", folder.name), folder, data.get("created", ""),
                            "", data.get("status", "ready"), summary)
    require_passed(record, override=allow)
    passed = ((data.get("metrics") or {}).get("parity") or {}).get("passed")
    parity = "fail" if record.status == "failed" or passed is False else "pass" if passed else "unknown"
    if fmt == "onnx":
        return Artifact(record.name, "onnx", folder / "onnx", parity)
    return Artifact(record.name, "gguf", gguf or _export_gguf(folder, summary), parity)


def _export_gguf(folder: Path, summary: dict[str, Any]) -> Path:
    if summary.get("file") and (folder / summary["file"]).is_file():
        return folder / summary["file"]
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise ApplianceError(f"{folder} should hold one .gguf file, found {len(found)}",
                             title="Damaged export", hint="export it again")
    return found[0]


def preload() -> None:
    """Load llama.cpp's library before anything else loads libstdc++ (numpy, aiohttp's extensions,
    torch): on a GPU host, a libllama built there and loaded after libstdc++ segfaulted in its
    tokenizer's set-up (bench/results/gguf-gpu-h100.md). Harmless where it is not needed; nothing
    where llama_cpp is not installed."""
    with contextlib.suppress(ImportError):
        import llama_cpp  # noqa: F401


def has_gpu_runtime(kind: str) -> bool:
    """Whether the runtime of an artifact kind here can compute on a GPU: a llama.cpp build with a
    GPU backend, an onnxruntime with the CUDA execution provider."""
    if kind == "gguf":
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    if kind == "onnx":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    return False


def open_engine(artifact: Artifact, *, threads: int | None = None, context_length: int | None = None,
                gpu: bool | None = None) -> ChatEngine:
    """Load the artifact in its runtime. threads None: `default_threads()`; context_length None:
    the model's trained context, at most DEFAULT_MAX_CONTEXT; gpu None: the GPU when the runtime
    has one, True: require it, False: CPU."""
    if threads is not None and threads < 1:
        raise ValidationError(f"threads is {threads}", hint="threads: 1 or more")
    if context_length is not None and context_length < 16:
        raise ValidationError(f"context_length is {context_length}", hint="context_length: 16 or more")
    if artifact.kind == "gguf":
        preload()
        from appliance.runtime.llama_engine import LlamaEngine

        return LlamaEngine(artifact, threads=threads, context_length=context_length, gpu=gpu)
    if artifact.kind == "onnx":
        from appliance.runtime.onnx_engine import OnnxEngine

        return OnnxEngine(artifact, threads=threads, context_length=context_length, gpu=gpu)
    raise ValidationError(f"unknown artifact kind {artifact.kind!r}", hint="gguf or onnx")
