"""Model import: a local HF folder (safetensors), a GGUF file, or the embedded default.

Import is where the appliance decides whether it can be faithful to a model, so it checks up front
and refuses with a reason rather than failing halfway through training or export:
- only safe weights (safetensors, GGUF); pickle checkpoints are refused, never loaded;
- no custom code (`auto_map`), ever; tokenizers load with `trust_remote_code=False`;
- shards complete and matching their index; a supported architecture;
- a chat template (or one supplied with --chat-template) that renders, that is prefix-stable, and
  whose assistant turns end with one of the model's stop tokens.

A GGUF file is dequantized into an HF folder (transformers reads GGUF) for training, and kept as
`gguf/<file>` as a ready inference artifact. Its tokenizer is rebuilt from the GGUF's own metadata
(special tokens, BOS policy, template) and checked token-for-token against llama.cpp's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import chat, modelio, stack
from appliance.errors import RefusedError, ValidationError
from appliance.fsutil import sha256_file
from appliance.workspace import ArtifactRecord, Workspace, check_name, slugify

Say = Callable[[str], None]

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
}
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len")
SKIP_SUFFIXES = (*modelio.PICKLE_SUFFIXES, ".py", ".pyc", ".gguf", ".msgpack", ".h5", ".onnx")
PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]
LARGE_MODEL_PARAMS = 1_000_000_000


def _quiet(*_: Any) -> None:
    pass


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError(f"{path} must hold a JSON object")
    return data


def _refuse_custom_code(folder: Path) -> None:
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists() and "auto_map" in _read_json(path):
            raise RefusedError(
                f"{path} declares custom code (auto_map); the appliance never runs code that "
                "ships with a model",
                hint="use a model whose architecture is built into transformers: "
                + ", ".join(SUPPORTED_ARCHITECTURES))


def _check_weights(folder: Path) -> list[Path]:
    shards = modelio.check_shards(folder)
    if shards:
        return shards
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in modelio.PICKLE_SUFFIXES)
    if pickles:
        raise RefusedError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:4])}); loading them can run "
            "arbitrary code, so the appliance refuses them",
            hint="get the model's .safetensors weights (or a GGUF) from its publisher")
    raise ValidationError(f"{folder} holds no model weights (*.safetensors)")


def _architecture(config: dict[str, Any], folder: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RefusedError(
            f"{folder / 'config.json'}: architecture {arch!r} is not supported",
            hint="supported: " + ", ".join(SUPPORTED_ARCHITECTURES))
    return arch


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise ValidationError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False,
                                             local_files_only=True)
    except Exception as exc:
        raise ValidationError(f"{folder}: the tokenizer does not load: {exc}") from exc


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def stop_token_ids(folder: Path, config: dict[str, Any], tokenizer: Any) -> list[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.exists():
        ids += _ids(_read_json(gen).get("eos_token_id"))
    ids += _ids(config.get("eos_token_id")) + _ids(tokenizer.eos_token_id)
    unique = sorted(set(ids))
    bad = [i for i in unique if not 0 <= i < len(tokenizer)]
    if bad or not unique:
        raise ValidationError(
            f"{folder}: EOS/stop token ids {bad or 'missing'} are not in the vocabulary "
            f"({len(tokenizer)} tokens)", hint="fix eos_token_id in generation_config.json")
    return unique


def _probe_template(tokenizer: Any, stops: list[str], folder: Path) -> dict[str, Any]:
    """Render a probe conversation; templates that reject a system turn are retried without."""
    supports_system = True
    try:
        rendered = chat.render_and_mask(tokenizer, PROBE, stops)
    except chat.TemplateError:
        supports_system = False
        try:
            rendered = chat.render_and_mask(tokenizer, PROBE[1:], stops)
        except chat.TemplateError as exc:
            raise chat.TemplateError(f"{folder}: {exc.message}", hint=exc.hint) from None
    trained = tokenizer.decode([t for t in rendered.labels if t != chat.IGNORE_INDEX])
    if "Green, like grass." not in trained or "Blue." not in trained:
        raise chat.TemplateError(f"{folder}: the chat template drops assistant content "
                                 f"(trained text: {trained!r})")
    return {"supports_system": supports_system, "probe_tokens": len(rendered.input_ids)}


def inspect_folder(folder: Path, chat_template: str | None = None) -> dict[str, Any]:
    """Every check of an HF model folder; returns what the manifest records about it."""
    if not folder.is_dir():
        raise ValidationError(f"{folder} is not a directory")
    config = _read_json(folder / "config.json")
    _refuse_custom_code(folder)
    shards = _check_weights(folder)
    arch = _architecture(config, folder)
    tokenizer = load_tokenizer(folder)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        raise RefusedError(f"{folder} has no chat template (tokenizer_config.json or "
                           "chat_template.jinja)",
                           hint="supply one with --chat-template FILE (a Jinja template)")
    stops = stop_token_ids(folder, config, tokenizer)
    stop_strings = tokenizer.convert_ids_to_tokens(stops)
    probe = _probe_template(tokenizer, stop_strings, folder)
    weights = modelio.weights_summary(shards)
    context = next((int(config[k]) for k in CONTEXT_KEYS if config.get(k)), None)
    return {
        "architecture": arch,
        "family": SUPPORTED_ARCHITECTURES[arch],
        "model_type": config.get("model_type"),
        "parameters": weights["parameters"],
        "dtype": config.get("torch_dtype") or config.get("dtype") or weights["dtype"],
        "weights_dtype": weights["dtype"],
        "context_length": context,
        "vocab_size": config.get("vocab_size") or len(tokenizer),
        "tokenizer_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "stop_token_ids": stops,
        "stop_tokens": stop_strings,
        "chat_template": tokenizer.chat_template,
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        **probe,
    }


def _copy(src: Path, dst: Path, say: Say) -> None:
    size = src.stat().st_size
    if size > 50 * 1024 * 1024:
        say(f"  copying {src.name} ({size / 2**20:.0f} MiB)")
    shutil.copyfile(src, dst)


def _install_template(folder: Path, template: str) -> None:
    """Make `template` the folder's chat template (chat_template.jinja wins over tokenizer_config)."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = _read_json(cfg_path)
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("architecture", "parameters", "context_length", "dtype", "vocab_size")
    return {k: info.get(k) for k in keys}


def import_folder(ws: Workspace, src: Path, *, name: str | None = None,
                  chat_template_file: Path | None = None, say: Say = _quiet) -> ArtifactRecord:
    src = src.expanduser().resolve()
    template = _read_template(chat_template_file)
    say(f"checking {src}")
    info = inspect_folder(src, template)
    name = check_name(name or slugify(src.name))
    with ws.writer("model", name) as w:
        skipped = []
        for path in sorted(src.iterdir()):
            if not path.is_file() or path.suffix in SKIP_SUFFIXES or path.name.startswith("."):
                skipped.append(path.name)
                continue
            _copy(path, w.path / path.name, say)
        if template is not None:
            _install_template(w.path, template)
        inspect_folder(w.path)  # the copy must pass the same checks as the source
        say("hashing files")
        w.commit(parents=[], config={"source": {"type": "hf-folder", "path": str(src)},
                                     "chat_template_file": str(chat_template_file or "")},
                 info={**info, "skipped_files": skipped, "summary": _summary(info)})
    return ws.get("model", name)


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read chat template {path}: {exc}") from None


# -- GGUF ------------------------------------------------------------------------------------
def _gguf_tokenizer(src: Path, meta: dict[str, Any], template: str, context: int | None) -> Any:
    """A clean fast tokenizer with the GGUF's own special tokens and BOS policy.

    transformers' GGUF tokenizer conversion can get special tokens wrong (for SmolLM2 it reports
    EOS as <|im_start|> and adds a BOS that llama.cpp does not), so the special tokens and the
    post-processor are set from the GGUF metadata here.
    """
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "legacy behaviour" notice does not apply to GGUF
    try:
        loaded = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    finally:
        hf_logging.set_verbosity(level)
    backend = loaded.backend_tokenizer
    vocab = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}

    def token(key: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{key}")
        return vocab.get(int(tid)) if tid is not None else None

    bos = token("bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    single = f"{bos}:0 $A:0" if add_bos else "$A:0"
    specials = [(bos, vocab_id) for vocab_id, t in vocab.items() if t == bos] if add_bos else []
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} $B:1", special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        chat_template=template, model_max_length=context or 2048,
        clean_up_tokenization_spaces=False)


def check_tokenizer_parity(gguf_path: Path, tokenizer: Any, text: str) -> dict[str, Any]:
    """Tokenize `text` with llama.cpp (vocab only) and with the HF tokenizer; they must agree."""
    try:
        import llama_cpp
    except ImportError:
        return {"checked": False, "reason": "llama-cpp-python is not installed"}
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    ours = tokenizer(text, add_special_tokens=False)["input_ids"]
    if list(theirs) != list(ours):
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                     min(len(theirs), len(ours)))
        raise ValidationError(
            f"{gguf_path}: the HF tokenizer rebuilt from the GGUF disagrees with llama.cpp at "
            f"token {first} (llama.cpp {theirs[first:first + 5]}, HF {ours[first:first + 5]})",
            hint="this tokenizer is not supported for GGUF import; import the model's HF folder")
    return {"checked": True, "tokens": len(ours), "runtime": f"llama.cpp {llama_cpp.__version__}"}


def import_gguf(ws: Workspace, src: Path, *, name: str | None = None,
                chat_template_file: Path | None = None, say: Say = _quiet,
                source: str = "gguf") -> ArtifactRecord:
    import torch
    from transformers import AutoModelForCausalLM

    src = src.expanduser().resolve()
    if not src.is_file():
        raise ValidationError(f"{src} is not a file")
    meta = modelio.gguf_metadata(src)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise RefusedError(f"{src}: GGUF architecture {arch!r} is not supported",
                           hint="supported GGUF architectures: " + ", ".join(GGUF_ARCHITECTURES))
    template = _read_template(chat_template_file) or meta.get("tokenizer.chat_template")
    if not template:
        raise RefusedError(f"{src} carries no chat template (tokenizer.chat_template)",
                           hint="supply one with --chat-template FILE")
    name = check_name(name or slugify(src.stem))
    big = meta["_parameters"] >= LARGE_MODEL_PARAMS
    dtype = torch.bfloat16 if big else torch.float32
    with ws.writer("model", name) as w:
        (w.path / "gguf").mkdir()
        _copy(src, w.path / "gguf" / src.name, say)
        say(f"dequantizing {src.name} to an HF folder ({str(dtype).removeprefix('torch.')})")
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                     dtype=dtype)
        model.save_pretrained(str(w.path), safe_serialization=True)
        del model
        context = meta.get(f"{arch}.context_length")
        tokenizer = _gguf_tokenizer(src, meta, template, context)
        tokenizer.save_pretrained(str(w.path))
        say("checking the result")
        info = inspect_folder(w.path)
        saved = load_tokenizer(w.path)  # what training will load, not the object we built
        parity = check_tokenizer_parity(w.path / "gguf" / src.name, saved,
                                        chat.render(saved, PROBE[1:]))
        say("hashing files")
        w.commit(parents=[], config={"source": {"type": source, "path": str(src),
                                                "sha256": sha256_file(src)},
                                     "dequantized_dtype": str(dtype).removeprefix("torch.")},
                 info={**info, "gguf_file": f"gguf/{src.name}",
                       "gguf_file_type": meta.get("general.file_type"),
                       "tokenizer_parity": parity, "summary": _summary(info)})
    return ws.get("model", name)


def import_default(ws: Workspace, *, say: Say = _quiet) -> ArtifactRecord:
    path = stack.default_model_path(verify=True)
    return import_gguf(ws, path, name=stack.DEFAULT_MODEL_NAME, say=say, source="default")


def import_path(ws: Workspace, src: Path, *, name: str | None = None,
                chat_template_file: Path | None = None, say: Say = _quiet) -> ArtifactRecord:
    """Dispatch on what `src` is: a GGUF file, an HF folder, or something refused."""
    src = src.expanduser()
    if not src.exists():
        raise ValidationError(f"{src} does not exist")
    if src.is_dir():
        return import_folder(ws, src, name=name, chat_template_file=chat_template_file, say=say)
    if src.suffix == ".gguf":
        return import_gguf(ws, src, name=name, chat_template_file=chat_template_file, say=say)
    if src.suffix in modelio.PICKLE_SUFFIXES:
        raise RefusedError(f"{src} is a pickle checkpoint; the appliance never unpickles weights",
                           hint="get .safetensors weights or a GGUF file from the publisher")
    raise ValidationError(f"{src}: expected an HF model folder or a .gguf file")
