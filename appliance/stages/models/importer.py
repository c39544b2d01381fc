"""Model import: a local HF folder (safetensors), a GGUF file, or the embedded default.

Import is where the appliance decides whether it can be faithful to a model, so it checks up front
and refuses with a reason rather than failing halfway through training or export:
- only safe weights (safetensors, GGUF); pickle checkpoints are refused, never loaded;
- no custom code (`auto_map`), ever; tokenizers load with `trust_remote_code=False`;
- shards complete and matching their index; a supported architecture; every tensor's shape and
  the layer count agree with config.json (transformers would otherwise fail at load, or silently
  fill missing layers with random weights);
- a `tokenizer.model` that is a SentencePiece model (llama.cpp's converter parses it); one that is
  not (a GGUF saved under that name) is left out when tokenizer.json is complete, else refused;
- a chat template (or one supplied with --chat-template) that renders, that is prefix-stable, and
  whose assistant turns end with one of the model's stop tokens;
- no link followed out of the imported folder (see `source_files`), and room on the disk.

A GGUF file is dequantized into an HF folder (transformers reads GGUF) for training, and kept as
`gguf/<file>` as a ready inference artifact. Its tokenizer is rebuilt from the GGUF's own metadata
(special tokens, BOS policy, template) and checked token-for-token against llama.cpp's.

On the edge profile (no torch, no transformers: `appliance.profile`) a GGUF import makes a
serve-only model instead: the GGUF is copied and hashed under `gguf/`, its metadata read, its chat
template checked with the runtime's own template code (the same probe and stop-token checks as
above, with the special tokens llama.cpp reads from the file), its stop tokens recorded, and the
manifest says `serve_only: true`. There is no HF folder: chat and serve open the GGUF by the
model's name; training, merging and exporting refuse it (`require_trainable`). Importing an HF
folder needs the full profile.

Both kinds of import report their stages (`appliance.progress.Stages`: read, copy, dequantize,
save, tokenizer, check, hash, with counts where there are some) to an optional `progress`, so a
40-second dequantization is a named, counted stage rather than silence.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance import chat, fsutil, hfmodel, licences, modelio, profile, stack
from appliance.errors import RefusedError, ValidationError
from appliance.hfmodel import PROBE, load_tokenizer, stop_token_ids
from appliance.progress import Progress, Stages
from appliance.workspace import ArtifactRecord, Workspace, check_name, slugify

Say = Callable[[str], None]
Count = Callable[[int, int], None]

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
LARGE_MODEL_PARAMS = 1_000_000_000
MIB = 2**20
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")
# What sets each dimension of a tensor, by the end of its name (first match wins), to name the
# config field a wrong shape comes from. The expected shapes themselves come from transformers.
DIM_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("q_norm.weight", ("head_dim",)),
    ("k_norm.weight", ("head_dim",)),
    ("embed_tokens.weight", ("vocab_size", "hidden_size")),
    ("lm_head.weight", ("vocab_size", "hidden_size")),
    ("qkv_proj.weight", ("(num_attention_heads + 2 × num_key_value_heads) × head_dim", "hidden_size")),
    ("q_proj.weight", ("num_attention_heads × head_dim", "hidden_size")),
    ("q_proj.bias", ("num_attention_heads × head_dim",)),
    ("k_proj.weight", ("num_key_value_heads × head_dim", "hidden_size")),
    ("k_proj.bias", ("num_key_value_heads × head_dim",)),
    ("v_proj.weight", ("num_key_value_heads × head_dim", "hidden_size")),
    ("v_proj.bias", ("num_key_value_heads × head_dim",)),
    ("o_proj.weight", ("hidden_size", "num_attention_heads × head_dim")),
    ("o_proj.bias", ("hidden_size",)),
    ("gate_up_proj.weight", ("2 × intermediate_size", "hidden_size")),
    ("gate_proj.weight", ("intermediate_size", "hidden_size")),
    ("up_proj.weight", ("intermediate_size", "hidden_size")),
    ("down_proj.weight", ("hidden_size", "intermediate_size")),
    ("norm.weight", ("hidden_size",)),
)
FIELD_RE = re.compile(r"[a-z_]+")


def _quiet(*_: Any) -> None:
    pass


# -- what is read from the source ---------------------------------------------------------------
def hf_cache_repo(folder: Path) -> Path | None:
    """The repository folder (`models--ORG--NAME`) when `folder` is one of its snapshots in the
    Hugging Face hub cache (`models--ORG--NAME/snapshots/REV/`), else None."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return None


def _refuse_cache_repo(folder: Path) -> None:
    """A hub cache repository folder itself holds no model: name the snapshot to import."""
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir() \
            and not (folder / "config.json").exists():
        snapshots = sorted((folder / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime)
        example = snapshots[-1] if snapshots else folder / "snapshots" / "REVISION"
        raise ValidationError(f"{folder} is a Hugging Face cache repository, not a model folder",
                              hint=f"import one of its snapshots, e.g. {example}")


def _default_name(folder: Path) -> str:
    repo = hf_cache_repo(folder)
    return slugify(repo.name.split("--", 2)[-1] if repo else folder.name)


def source_files(folder: Path) -> dict[str, Path]:
    """The files at the top of an imported folder, by name, with the path each is read from.

    Links are never followed out of the folder. A link is accepted only when it resolves to a
    regular file inside the folder itself or, for a snapshot of the Hugging Face hub cache
    (`models--ORG--NAME/snapshots/REV/FILE -> ../../blobs/SHA256`), inside that same repository's
    `blobs/`, where the cache keeps every file's content. Any other link (to a file elsewhere, to
    another repository's blobs, to a directory, to nothing) is refused, naming the link and its
    target; so is a FIFO, socket or device. Subfolders are neither read nor copied. The folder
    itself, the path the operator named, may be a link (like `cp -rH`)."""
    repo = hf_cache_repo(folder)
    roots = [folder.resolve(), *([(repo / "blobs").resolve()] if repo else [])]
    files: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if stat.S_ISREG(mode):
            files[entry.name] = entry
        elif stat.S_ISLNK(mode):
            files[entry.name] = _accepted_link(entry, roots)
        else:
            raise RefusedError(f"{entry} is not a regular file (a FIFO, socket or device)",
                               hint="a model folder holds files only: remove it from the folder")
    return files


def _accepted_link(entry: Path, roots: list[Path]) -> Path:
    target = os.readlink(entry)
    try:
        real = entry.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):
        raise RefusedError(f"{entry} is a link to {target}, which does not exist",
                           hint="copy the complete model folder, or remove the link") from None
    if not regular or not any(real.is_relative_to(root) for root in roots):
        where = "a directory" if real.is_dir() else "outside the model folder"
        raise RefusedError(
            f"{entry} is a link to {target} ({real}), {where}; the appliance never follows links "
            "out of an imported folder",
            hint="copy the file itself into the folder (cp -L), or remove the link")
    return real


def _regular_file(path: Path) -> Path:
    """The file a path named by the operator stands for (a link is followed): a regular file."""
    try:
        real = path.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):
        raise ValidationError(f"{path} does not exist") from None
    if not regular:
        raise ValidationError(f"{path} is not a regular file")
    return real


def _refuse_custom_code(folder: Path) -> None:
    for name in ("config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists() and "auto_map" in hfmodel.read_json(path):
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


# -- tensors against config.json ----------------------------------------------------------------
def _expected_tensors(arch: str, config: dict[str, Any], folder: Path) -> tuple[Any, dict, set]:
    """transformers' own view of the model config.json describes: its config object (defaults
    filled in: head_dim, num_key_value_heads, tie_word_embeddings), every tensor's shape, and the
    tensors a checkpoint must hold (a tied output layer need not be stored). Built on the meta
    device: no memory, no weights."""
    import torch
    import transformers

    cls = getattr(transformers, arch)
    try:
        cfg = cls.config_class.from_dict(config)
        with torch.device("meta"):
            model = cls(cfg)
    except Exception as exc:  # an inconsistent config: transformers' own message says why
        raise ValidationError(f"{folder / 'config.json'}: transformers cannot build a {arch} "
                              f"from it: {exc}") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return cfg, shapes, {name for name, _ in model.named_parameters()}


def _field_value(cfg: Any, field: str) -> Any:
    if field == "head_dim":
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return getattr(cfg, field, None)


def _explain(name: str, shape: tuple[int, ...], expected: tuple[int, ...], cfg: Any) -> str:
    """`dim 1 should be hidden_size = 64` for each dimension that differs."""
    fields = next((dims for end, dims in DIM_FIELDS if name.endswith(end)), ())
    parts = []
    for i, (have, want) in enumerate(zip(shape, expected, strict=False)):
        if have == want:
            continue
        expr = fields[i] if i < len(fields) else "?"
        names = list(dict.fromkeys(FIELD_RE.findall(expr)))
        values = ", ".join(f"{f} = {_field_value(cfg, f)}" for f in names)
        parts.append(f"dim {i} should be {expr} = {want}" + (f" ({values})" if len(names) > 1
                                                             or expr not in names else ""))
    if len(shape) != len(expected):
        parts.append(f"{len(expected)} dimensions expected")
    return "; ".join(parts)


def _check_layers(folder: Path, cfg: Any, names: set[str]) -> None:
    want = int(cfg.num_hidden_layers)
    have = {int(m[1]) for n in names if (m := LAYER_RE.match(n))}
    missing, extra = sorted(set(range(want)) - have), sorted(have - set(range(want)))
    stated = f"{folder / 'config.json'} says num_hidden_layers = {want}"
    if missing:
        raise ValidationError(
            f"{stated}, but the weights hold no tensors for model.layers.{missing[0]} "
            f"({len(missing)} of {want} layers missing; transformers would fill them with random "
            "weights)", hint="the config does not belong to these weights: copy both from the "
            "same model")
    if extra:
        raise ValidationError(
            f"{stated}, but the weights also hold model.layers.{extra[0]} ({len(extra)} more "
            "layer(s), which would be ignored)",
            hint="the config does not belong to these weights: copy both from the same model")


def check_tensors(folder: Path, config: dict[str, Any], shards: list[Path]) -> None:
    """Refuse weights that disagree with config.json: a layer count, a missing tensor, a shape.

    The names and shapes come from the safetensors headers (nothing is loaded); what they should be
    comes from transformers building the architecture from this config on the meta device, so
    head_dim, grouped-query heads, tied embeddings, Phi-3's fused qkv/gate_up and Qwen3's q/k norms
    are exactly transformers' own. Tensors the model does not have are left alone (transformers
    ignores them). Pre-quantized checkpoints (`quantization_config`) store other tensors and are
    not checked here."""
    if config.get("quantization_config"):
        return
    arch = _architecture(config, folder)
    cfg, shapes, required = _expected_tensors(arch, config, folder)
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in shards:
        for name, info in modelio.read_safetensors_header(shard).items():
            found[name] = (shard, tuple(info.shape))
    _check_layers(folder, cfg, set(found))
    for name, expected in shapes.items():
        if name not in found:
            if name in required:
                tied = " and config.json has tie_word_embeddings = false" \
                    if name == "lm_head.weight" else ""
                raise ValidationError(
                    f"{folder}: tensor {name} is missing from the weights{tied} (transformers "
                    "would fill it with random weights)",
                    hint="copy the complete model folder; its config must belong to its weights")
            continue
        shard, shape = found[name]
        if shape != expected:
            raise ValidationError(
                f"{shard}: tensor {name} has shape {list(shape)}, but {folder / 'config.json'} "
                f"gives {list(expected)}: {_explain(name, shape, expected, cfg)}",
                hint="the config does not belong to these weights: copy both from the same model")


# -- tokenizer ----------------------------------------------------------------------------------
def _tokenizer_json_problem(path: Path) -> str | None:
    """Why tokenizer.json cannot stand in for the whole tokenizer (None: it can)."""
    if not path.is_file():
        return "there is no tokenizer.json to use instead"
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own Exception type on a bad file
        return f"tokenizer.json does not load either ({exc})"
    return None if size > 0 else "tokenizer.json holds no vocabulary"


def tokenizer_model_left_out(folder: Path) -> dict[str, str] | None:
    """A tokenizer.model that is not a SentencePiece model: what to record when it is left out
    (tokenizer.json is complete, and is what transformers loads), or a ValidationError naming it
    (there is no complete tokenizer.json). None when there is no such file or it is fine."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        return None
    problem = modelio.sentencepiece_problem(path)
    if problem is None:
        return None
    instead = _tokenizer_json_problem(folder / "tokenizer.json")
    if instead is not None:
        raise ValidationError(f"{path} is not a SentencePiece model: {problem}; {instead}",
                              hint="copy the model's original tokenizer.model or tokenizer.json")
    return {"file": "tokenizer.model",
            "reason": f"not a SentencePiece model ({problem}); tokenizer.json is complete and is "
                      "what the tokenizer loads, and llama.cpp's converter would fail on it"}


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


# -- the checks, together -----------------------------------------------------------------------
def check_model_files(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """config.json, custom code, weights and their shapes: everything but the tokenizer, from
    headers only (cheap even for a large model). Returns the config and the weight files."""
    if not folder.is_dir():
        raise ValidationError(f"{folder} is not a directory")
    config = hfmodel.read_json(folder / "config.json")
    _refuse_custom_code(folder)
    shards = _check_weights(folder)
    _architecture(config, folder)
    check_tensors(folder, config, shards)
    return config, shards


def check_tokenizer(folder: Path, config: dict[str, Any],
                    chat_template: str | None = None) -> dict[str, Any]:
    """The tokenizer loads, has a chat template that passes the probe, and knows the stop tokens."""
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
    return {
        "vocab_size": config.get("vocab_size") or len(tokenizer),
        "tokenizer_size": len(tokenizer),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "stop_token_ids": stops,
        "stop_tokens": stop_strings,
        "chat_template": tokenizer.chat_template,
        **probe,
    }


def inspect_folder(folder: Path, chat_template: str | None = None) -> dict[str, Any]:
    """Every check of an HF model folder; returns what the manifest records about it."""
    config, shards = check_model_files(folder)
    tokenizer_model_left_out(folder)  # raises if it is bad and nothing can replace it
    arch = _architecture(config, folder)
    tok = check_tokenizer(folder, config, chat_template)
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
        **tok,
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
    }


# -- copying ------------------------------------------------------------------------------------
def check_space(ws: Workspace, files: list[Path], extra: int = 0) -> None:
    """Refuse an import that cannot fit, before copying anything: `files` plus `extra` bytes."""
    needs = sum(p.stat().st_size for p in files) + extra
    free = fsutil.free_bytes(ws.root)
    if 0 <= free < needs:
        raise fsutil.disk_full_error(ws.root, f"the import needs about {-(-needs // 10**6)} MB")


def _copy(src: Path, dst: Path, count: Count | None = None, *, digest: bool = False) -> str:
    """Copy a regular file (never through a link) to a new 0600 file; its sha256 if asked for."""
    try:  # O_NONBLOCK: a FIFO put in the folder must not hang the open (regular files ignore it)
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise RefusedError(f"{src} became a symbolic link while it was imported",
                           hint="links are never followed out of an imported folder") from exc
    sha = hashlib.sha256() if digest else None
    with os.fdopen(fd, "rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise RefusedError(f"{src} is not a regular file")
        with open(dst, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as fout:
            done = 0
            while chunk := fin.read(fsutil.CHUNK * 8):
                fout.write(chunk)
                if sha is not None:
                    sha.update(chunk)
                done += len(chunk)
                if count:
                    count(done // MIB, max(size // MIB, 1))
    if count:
        count(max(size // MIB, 1), max(size // MIB, 1))
    return sha.hexdigest() if sha is not None else ""


def _copier(files: dict[str, Path], dst: Path, say: Say, stages: Stages) -> Callable[[str], None]:
    """Copies `files` one name at a time into `dst`, counting MiB over all of them."""
    total = max(sum(p.stat().st_size for p in files.values()) // MIB, 1)
    count = stages.counter("copy", "copying the model's files", "MiB", total)
    done = [0]

    def copy(name: str) -> None:
        path = files[name]
        size = path.stat().st_size
        if size > 50 * MIB:
            say(f"  copying {name} ({size / MIB:.0f} MiB)")
        _copy(path, dst / name, lambda d, _t: count(min(done[0] + d, total), total))
        done[0] += size // MIB
        if name == next(reversed(files)):
            count(total, total)

    return copy


def _hash_count(stages: Stages, folder: Path) -> Callable[[int], None]:
    """manifest.build's progress (bytes hashed) as a counted `hash` stage in MiB."""
    total = max(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) // MIB, 1)
    count = stages.counter("hash", "hashing files", "MiB", total)
    done = [0]

    def add(n: int) -> None:
        done[0] += n
        count(min(done[0] // MIB, total), total)

    return add


def _install_template(folder: Path, template: str) -> None:
    """Make `template` the folder's chat template (chat_template.jinja wins over tokenizer_config)."""
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = hfmodel.read_json(cfg_path)
        if cfg.pop("chat_template", None) is not None:
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("architecture", "parameters", "context_length", "dtype", "vocab_size")
    return {k: info.get(k) for k in keys}


def _select(files: dict[str, Path], left_out: dict[str, str] | None) -> tuple[dict, list[str]]:
    """The files an import copies (small ones first, weights last) and the names it skips."""
    keep, skipped = {}, []
    for name, path in files.items():
        if Path(name).suffix in SKIP_SUFFIXES or name.startswith(".") or \
                (left_out and name == left_out["file"]):
            skipped.append(name)
        else:
            keep[name] = path
    weights_last = sorted(keep, key=lambda n: (n.endswith(".safetensors"), n))
    return {n: keep[n] for n in weights_last}, skipped


def import_folder(ws: Workspace, src: Path, *, name: str | None = None,
                  chat_template_file: Path | None = None, say: Say = _quiet,
                  progress: Progress | None = None) -> ArtifactRecord:
    profile.require_full("importing an HF model folder")  # its checks build it in transformers
    src = src.expanduser().resolve()
    _refuse_cache_repo(src)
    template = _read_template(chat_template_file)
    name = check_name(name or _default_name(src))
    stages = Stages(progress, artifact=name)
    say(f"checking {src}")
    stages.emit("read", f"checking {src.name}")
    files = source_files(src)
    config, _ = check_model_files(src)
    left_out = tokenizer_model_left_out(src)
    if left_out:
        say(f"  left out {left_out['file']}: {left_out['reason']}")
    keep, skipped = _select(files, left_out)
    check_space(ws, list(keep.values()))
    with ws.writer("model", name) as w:
        copy = _copier(keep, w.path, say, stages)
        small = [n for n in keep if not n.endswith(".safetensors")]
        for file in small:
            copy(file)
        if template is not None:
            _install_template(w.path, template)
        check_tokenizer(w.path, config)  # before the weights: a bad tokenizer or template fails fast
        for file in keep:
            if file not in small:
                copy(file)
        stages.emit("check", "checking the copy")
        info = inspect_folder(w.path)  # the copy must pass every check
        say("hashing files")
        texts = licences.copy_texts(licences.files_beside(src), w.path)
        info["license"] = licences.record(licences.from_model_card(src), texts, w.path)
        w.commit(parents=[], config={"source": {"type": "hf-folder", "path": str(src)},
                                     "chat_template_file": str(chat_template_file or "")},
                 info={**info, "skipped_files": skipped, "left_out": [left_out] if left_out else [],
                       "summary": _summary(info)},
                 progress=_hash_count(stages, w.path))
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


def _vocab_only(path: Path) -> Any:
    """llama.cpp's view of the file's vocabulary, without its weights. Making it, llama.cpp warns
    that the context exceeds the training context ("n_ctx_train (0)": no weights are read), and
    llama-cpp-python prints that warning past `verbose=False` (its callback maps ggml's log levels
    as they were before ggml renumbered them: WARN reads as ERROR). Noise in the middle of an
    import: Python's and the process's stderr are muted meanwhile. A file llama.cpp cannot read
    still raises."""
    import io

    import llama_cpp

    from appliance.runtime.template import check_gguf_templates

    check_gguf_templates(path)  # Llama() compiles the file's templates with unbounded Jinja
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        with contextlib.redirect_stderr(io.StringIO()):
            return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def check_tokenizer_parity(gguf_path: Path, tokenizer: Any, text: str) -> dict[str, Any]:
    """Tokenize `text` with llama.cpp (vocab only) and with the HF tokenizer; they must agree."""
    try:
        import llama_cpp
    except ImportError:
        return {"checked": False, "reason": "llama-cpp-python is not installed"}
    llm = _vocab_only(gguf_path)
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


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers' GGUF loading parses the file's metadata once for the config, once for the
    weights and once for the tokenizer (gguf-py's `GGUFReader`: ~5 s each for a 49k-token
    vocabulary on the 2-core box), and builds gguf-py's tensor-name map once per module of the
    model (397 times for SmolLM2: 7 s). Within this block each file is parsed once and each map
    built once: the same objects, read only, handed out again (transformers looks both names up
    in `gguf` when it runs)."""
    import functools

    import gguf

    module: Any = gguf  # its names are rebound for the block: typed as the module they stand in for
    reader, name_map = module.GGUFReader, module.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def parsed_once(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    module.GGUFReader, module.get_tensor_name_map = parsed_once, functools.cache(name_map)
    try:
        yield
    finally:
        module.GGUFReader, module.get_tensor_name_map = reader, name_map
        readers.clear()


@contextlib.contextmanager
def _counting_gguf_tensors(start: Callable[[int], Count]) -> Iterator[None]:
    """Count the tensors transformers dequantizes: `start(n)` when its loop over the n tensors
    begins (after it has read the file's metadata, most of the wait on a small model), then the
    returned counter after each tensor. transformers walks them under a tqdm bar named `tqdm` in
    `transformers.modeling_gguf_pytorch_utils`; while this block runs, that name counts instead
    (and keeps the bar out of the job's log). A transformers without that name counts nothing:
    the stage is still named, only its count is missing."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def counting(iterable: Any = None, *_: Any, **__: Any) -> Iterator[Any]:
        items = list(iterable or ())
        count = start(len(items))
        for i, item in enumerate(items, 1):
            yield item
            count(i, len(items))

    gguf_utils.tqdm = counting
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def import_gguf(ws: Workspace, src: Path, *, name: str | None = None,
                chat_template_file: Path | None = None, say: Say = _quiet,
                source: str = "gguf", progress: Progress | None = None) -> ArtifactRecord:
    """Import a GGUF file. A link named by the operator is followed (the hub cache's
    snapshots/REV/x.gguf -> ../../blobs/SHA); the copy keeps the name it was given. On the edge
    profile the model is serve-only (`import_gguf_serve_only`)."""
    if not profile.is_full():
        return import_gguf_serve_only(ws, src, name=name, chat_template_file=chat_template_file,
                                      say=say, source=source, progress=progress)
    import torch
    from transformers import AutoModelForCausalLM

    given = src.expanduser()
    real = _regular_file(given)
    name = check_name(name or slugify(given.stem))
    stages = Stages(progress, artifact=name)
    stages.emit("read", f"reading {given.name}")
    meta = modelio.gguf_metadata(real)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise RefusedError(f"{given}: GGUF architecture {arch!r} is not supported",
                           hint="supported GGUF architectures: " + ", ".join(GGUF_ARCHITECTURES))
    template = _read_template(chat_template_file) or meta.get("tokenizer.chat_template")
    if not template:
        raise RefusedError(f"{given} carries no chat template (tokenizer.chat_template)",
                           hint="supply one with --chat-template FILE")
    big = meta["_parameters"] >= LARGE_MODEL_PARAMS
    dtype = torch.bfloat16 if big else torch.float32
    check_space(ws, [real], extra=meta["_parameters"] * (2 if big else 4))
    with ws.writer("model", name) as w:
        (w.path / "gguf").mkdir(mode=0o700)
        copy = w.path / "gguf" / given.name
        size = real.stat().st_size
        if size > 50 * MIB:
            say(f"  copying {given.name} ({size / MIB:.0f} MiB)")
        sha256 = _copy(real, copy, stages.counter("copy", f"copying {given.name}", "MiB",
                                                  max(size // MIB, 1)), digest=True)
        kind = str(dtype).removeprefix("torch.")
        label = f"dequantizing {given.name} to an HF folder ({kind})"
        say(label)
        stages.emit("dequantize", f"{label}: reading its metadata")

        def start(tensors: int) -> Count:
            return stages.counter("dequantize", label, "tensors", tensors)

        with _gguf_parsed_once():
            with _counting_gguf_tensors(start):  # read from the copy: no stray files beside it
                model = AutoModelForCausalLM.from_pretrained(str(copy.parent), gguf_file=copy.name,
                                                             dtype=dtype)
            stages.emit("save", "writing model.safetensors")
            model.save_pretrained(str(w.path), safe_serialization=True)
            del model
            context = meta.get(f"{arch}.context_length")
            say("rebuilding the tokenizer from the GGUF")
            stages.emit("tokenizer", "rebuilding the tokenizer from the GGUF")
            tokenizer = _gguf_tokenizer(copy, meta, template, context)
        tokenizer.save_pretrained(str(w.path))
        say("checking the result")
        stages.emit("check", "checking the result")
        info = inspect_folder(w.path)
        saved = load_tokenizer(w.path)  # what training will load, not the object we built
        parity = check_tokenizer_parity(copy, saved, chat.render(saved, PROBE[1:]))
        say("hashing files")
        texts = licences.copy_texts(licences.files_beside(given), w.path)
        info["license"] = licences.record(licences.from_gguf(meta), texts, w.path)
        w.commit(parents=[], config={"source": {"type": source, "path": str(given.absolute()),
                                                "sha256": sha256},
                                     "dequantized_dtype": kind},
                 info={**info, "gguf_file": f"gguf/{given.name}",
                       "gguf_file_type": meta.get("general.file_type"),
                       "tokenizer_parity": parity, "summary": _summary(info)},
                 progress=_hash_count(stages, w.path))
    return ws.get("model", name)


# -- serve-only GGUF import (the edge profile) ---------------------------------------------------
class _TemplateOnly:
    """What `appliance.chat.render` reads of a tokenizer (its template and special tokens), with no
    tokenizer: the probe checks a serve-only import's template exactly as an HF import's."""

    def __init__(self, template: str, special_tokens: dict[str, str], origin: str) -> None:
        self.chat_template = template
        self.special_tokens_map = special_tokens
        self.name_or_path = origin

    def get_chat_template(self, template: str | None = None) -> str:
        return template or self.chat_template


# GGUF metadata keys of the special tokens, by the name templates know them under
GGUF_SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                     "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
GGUF_STOP_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")


def _metadata_id(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{key}")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _gguf_vocab(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What the runtime sees of the GGUF's vocabulary: the text of every special token the metadata
    names, the end-of-generation ids and the vocabulary size, read by llama.cpp itself (vocab only,
    a fraction of a second), or by gguf-py when llama-cpp-python is not installed."""
    wanted = {i for key in (*GGUF_SPECIAL_KEYS.values(), *GGUF_STOP_KEYS)
              if (i := _metadata_id(meta, key)) is not None}
    try:
        import llama_cpp
    except ImportError:
        from gguf import GGUFReader

        tokens = GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
        size = len(tokens.data) if tokens is not None else 0
        texts = {i: str(tokens.contents(i)) for i in wanted if tokens is not None and i < size}
        return {"texts": texts, "eog": sorted(i for i in wanted if i in texts), "size": size or None,
                "tokenize": None, "runtime": "gguf-py (llama-cpp-python is not installed)"}
    llm = _vocab_only(path)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        size = int(llm.n_vocab())
        eog = [i for i in range(size) if llama_cpp.llama_vocab_is_eog(vocab, i)]

        def text(i: int) -> str:
            return bytes(llama_cpp.llama_vocab_get_text(vocab, i)).decode("utf-8", "replace")

        texts = {i: text(i) for i in wanted | set(eog) if i < size}
        def probe_len(t: str) -> int:
            return len(llm.tokenize(t.encode("utf-8"), add_bos=False, special=True))

        return {"texts": texts, "eog": eog, "size": size, "tokenize": probe_len,
                "runtime": f"llama.cpp {llama_cpp.__version__}", "_llm": llm}
    except Exception:
        with contextlib.suppress(Exception):
            llm.close()
        raise


def _check_serve_template(path: Path, template: str, meta: dict[str, Any],
                          vocab: dict[str, Any]) -> dict[str, Any]:
    """The probe conversation through the runtime's bounded template code, with the special tokens
    the runtime renders with: it must render (with a system turn, or without when the template
    refuses one), be prefix-stable and end each assistant turn with an end-of-generation token.
    Returns what the manifest records: the special tokens, the stop tokens (the GGUF's EOS/EOT/EOM
    ids and every end-of-generation token the template writes), the probe's token count."""
    texts: dict[int, str] = vocab["texts"]
    special = {name: texts[i] for name, key in GGUF_SPECIAL_KEYS.items()
               if (i := _metadata_id(meta, key)) is not None and i in texts}
    stops_by_id = {i: texts[i] for i in vocab["eog"] if texts.get(i)}
    declared = [i for key in GGUF_STOP_KEYS if (i := _metadata_id(meta, key)) is not None]
    stops_by_id |= {i: texts[i] for i in declared if texts.get(i)}
    if not stops_by_id:
        raise RefusedError(f"{path}: the GGUF names no end-of-generation token "
                           "(tokenizer.ggml.eos_token_id)",
                           hint="a model that cannot stop cannot be served: use another GGUF")
    shim = _TemplateOnly(template, special, f"{path}: tokenizer.chat_template")
    stop_texts = list(dict.fromkeys(stops_by_id.values()))
    supports_system = True
    try:
        text, spans = chat.assistant_spans(shim, PROBE, stop_texts)
    except chat.TemplateError:
        supports_system = False
        text, spans = chat.assistant_spans(shim, PROBE[1:], stop_texts)
    trained = "".join(text[a:b] for a, b in spans)
    if "Green, like grass." not in trained or "Blue." not in trained:
        raise chat.TemplateError(f"{path}: the chat template drops assistant content "
                                 f"(assistant text: {trained!r})")
    written = {i for i, t in stops_by_id.items() if t in trained}
    stop_ids = list(dict.fromkeys([*declared, *sorted(written)]))
    chat.render(shim, PROBE[1:], generation_prompt=True)  # what the runtime renders: it must too
    tokenize = vocab["tokenize"]
    return {
        **special,
        "stop_token_ids": stop_ids,
        "stop_tokens": [texts.get(i, "") for i in stop_ids],
        "chat_template": template,
        "supports_system": supports_system,
        "probe_tokens": tokenize(text) if tokenize else None,
        "template_check": {"checked": True, "runtime": vocab["runtime"]},
    }


def _gguf_dtype(meta: dict[str, Any]) -> str | None:
    """The GGUF's file type by name (`Q4_1`), from general.file_type."""
    value = meta.get("general.file_type")
    if not isinstance(value, int):
        return None
    try:
        from gguf import LlamaFileType

        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return f"file type {value}"


def import_gguf_serve_only(ws: Workspace, src: Path, *, name: str | None = None,
                           chat_template_file: Path | None = None, say: Say = _quiet,
                           source: str = "gguf", progress: Progress | None = None) -> ArtifactRecord:
    """A serve-only model from a GGUF file, with no torch and no transformers (the edge profile):
    the GGUF copied and hashed under gguf/, its template checked with the runtime's template code
    and the special tokens llama.cpp reads from it, its stop tokens recorded. No HF folder, no
    tokenizer rebuild: it is served, never trained (`require_trainable`)."""
    given = src.expanduser()
    real = _regular_file(given)
    name = check_name(name or slugify(given.stem))
    stages = Stages(progress, artifact=name)
    stages.emit("read", f"reading {given.name}")
    meta = modelio.gguf_metadata(real)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise RefusedError(f"{given}: GGUF architecture {arch!r} is not supported",
                           hint="supported GGUF architectures: " + ", ".join(GGUF_ARCHITECTURES))
    template = meta.get("tokenizer.chat_template")
    supplied = _read_template(chat_template_file)
    if supplied is not None and supplied != template:
        # the runtime renders the template the GGUF carries; only a dequantized model takes another
        profile.require_full("importing a GGUF with another chat template (--chat-template)")
    if not template or not isinstance(template, str):
        raise RefusedError(f"{given} carries no chat template (tokenizer.chat_template)",
                           hint="the runtime serves a GGUF with the template it carries: use a GGUF "
                                "that has one, or import this one on the full profile with "
                                "--chat-template FILE")
    check_space(ws, [real])
    with ws.writer("model", name) as w:
        (w.path / "gguf").mkdir(mode=0o700)
        copy = w.path / "gguf" / given.name
        size = real.stat().st_size
        if size > 50 * MIB:
            say(f"  copying {given.name} ({size / MIB:.0f} MiB)")
        sha256 = _copy(real, copy, stages.counter("copy", f"copying {given.name}", "MiB",
                                                  max(size // MIB, 1)), digest=True)
        say("checking the chat template and stop tokens (serve-only: no HF folder on this profile)")
        stages.emit("check", "checking the chat template with the runtime's template code")
        vocab = _gguf_vocab(copy, meta)  # read from the copy: what will be served
        try:
            checked = _check_serve_template(copy, template, meta, vocab)
        finally:
            llm = vocab.pop("_llm", None)
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.close()
        context = meta.get(f"{arch}.context_length")
        info = {
            "architecture": GGUF_ARCHITECTURES[arch],
            "family": arch,
            "model_type": arch,
            "parameters": meta["_parameters"],
            "dtype": _gguf_dtype(meta),
            "context_length": int(context) if isinstance(context, int) else None,
            "vocab_size": vocab["size"],
            **checked,
            "serve_only": True,
            "gguf_file": f"gguf/{given.name}",
            "gguf_file_type": meta.get("general.file_type"),
            "gguf_sha256": sha256,
        }
        texts = licences.copy_texts(licences.files_beside(given), w.path)
        info["license"] = licences.record(licences.from_gguf(meta), texts, w.path)
        say("hashing files")
        w.commit(parents=[], config={"source": {"type": source, "path": str(given.absolute()),
                                                "sha256": sha256},
                                     "profile": profile.current()},
                 info={**info, "summary": {**_summary(info), "serve_only": True}},
                 progress=_hash_count(stages, w.path))
    return ws.get("model", name)


def is_serve_only(record: ArtifactRecord) -> bool:
    """A model with no HF folder (a GGUF imported on the edge profile): it can be served only."""
    return bool(record.summary.get("serve_only"))


def require_trainable(record: ArtifactRecord, what: str = "training") -> None:
    """Refuse `what` (training, merging, exporting) on this install or from this model, in one line:
    the edge profile cannot train at all; a serve-only model has no weights to train from."""
    profile.require_full(what)
    if is_serve_only(record):
        raise RefusedError(
            f"model {record.name!r} is serve-only (a GGUF imported on the edge profile): {what} "
            "needs its HF weights, which it does not have",
            title="Serve-only model",
            hint=f"import it again on this full install: appliance models rm {record.name}, then "
                 "appliance models import FILE.gguf (or --default); chat and serve take it as it is")


def import_default(ws: Workspace, *, name: str | None = None, say: Say = _quiet,
                   progress: Progress | None = None) -> ArtifactRecord:
    """The embedded default model, under `name` (default: its own name)."""
    path = stack.default_model_path(verify=True)
    return import_gguf(ws, path, name=name or stack.DEFAULT_MODEL_NAME, say=say, source="default",
                       progress=progress)


def import_path(ws: Workspace, src: Path, *, name: str | None = None,
                chat_template_file: Path | None = None, say: Say = _quiet,
                progress: Progress | None = None) -> ArtifactRecord:
    """Dispatch on what `src` is: a GGUF file, an HF folder, or something refused. `progress`
    gets the import's stages (see the module docstring)."""
    src = src.expanduser()
    if not src.exists():
        raise ValidationError(f"{src} does not exist")
    if src.is_dir():
        return import_folder(ws, src, name=name, chat_template_file=chat_template_file, say=say,
                             progress=progress)
    if src.suffix == ".gguf":
        return import_gguf(ws, src, name=name, chat_template_file=chat_template_file, say=say,
                           progress=progress)
    if src.suffix in modelio.PICKLE_SUFFIXES:
        raise RefusedError(f"{src} is a pickle checkpoint; the appliance never unpickles weights",
                           hint="get .safetensors weights or a GGUF file from the publisher")
    raise ValidationError(f"{src}: expected an HF model folder or a .gguf file")
