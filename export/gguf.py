"""HF folder -> GGUF (llama.cpp's own converter and quantizer), checked, plus an Ollama Modelfile.

Why it is built this way:
- The converter is llama.cpp's `convert_hf_to_gguf.py` from the same sdist the runtime was built
  from (`stack.converter_dir()`), so file format and runtime agree. It runs in a child process
  behind the offline guard; its output is streamed to `progress`, and it writes to `<out>.partial`,
  renamed only on success, so a failure never leaves a file that looks finished.
- Quantization calls llama.cpp's C API (`llama_model_quantize`) in a child process too: llama.cpp
  prints a line per tensor to the C-level stderr (which would tear a terminal UI), and a C++
  abort on a bad file must not take the caller down. With an importance matrix it goes through
  llama.cpp's own tools instead (`export.imatrix`: the C API takes one only as a C++ map).
- Every GGUF written is checked before it is handed out: the chat template and EOS id in its
  metadata must be the model's, every stop token must end generation in llama.cpp, and llama.cpp
  must tokenize a rendered chat exactly like the HF tokenizer. The llama.cpp side of that check
  runs in a child process for the same crash-isolation reason (a truncated or corrupt file can
  abort inside llama.cpp).
- Tokenizers rebuilt from a GGUF by transformers (our import path) come out as a byte-level BPE
  with `byte_fallback` and a SentencePiece-style decoder chain. llama.cpp's converter mistakes that
  for a SentencePiece vocabulary and writes a GGUF that llama.cpp cannot load (it aborts looking
  up the `<0x0A>` token). The converter therefore reads a staging view of the folder whose
  tokenizer.json is put back into the plain byte-level form when, and only when, that is provably
  the same tokenizer (the vocabulary has no `<0xNN>` tokens, so byte fallback can never fire).
- The converter parses any `tokenizer.model` it finds as SentencePiece and stops ("could not parse
  ModelProto") on one that is not (a GGUF that transformers saved under that name). Import leaves
  such a file out; for folders made before that, the staging view leaves it out too, so the
  converter reads tokenizer.json instead (`appliance.modelio.sentencepiece_problem` decides).
- The Ollama Modelfile written beside each GGUF comes from `export.ollama` (see there for how its
  TEMPLATE is checked against the model's Jinja template).

Headless: never imports Textual; llama_cpp, numpy and transformers are imported inside functions.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import hfmodel, modelio, offline, stack
from appliance.errors import ApplianceError, IntegrityError, RefusedError, ValidationError

LineSink = Callable[[str], None]  # where a tool's output lines go, one call per line
Counts = Callable[[int, int], None]  # (done, total), from the tools' own output

OUTTYPES = ("f16", "bf16", "f32", "q8_0")
QUANT_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
                           "IQ3_XS", "Q2_K_S"})
NOT_OFFERED = {
    "TQ1_0": "ternary (BitNet-style) models", "TQ2_0": "ternary (BitNet-style) models",
    "MXFP4_MOE": "mixture-of-experts models", "NVFP4": "hardware with native FP4 support",
    "Q1_0": "models trained for 1-bit weights", "Q2_0": "models trained for 2-bit weights",
}
TAIL_LINES = 30
# Text beyond the chat template that tokenizers tend to disagree on: digits, accents, symbols,
# runs of spaces, tabs and newlines, an emoji.
PARITY_TEXT = "Prix : 1234,50 €  —  naïve café\n\n\tx = [1, 22, 333];  // done 😀"


def _quiet(_: str) -> None:
    pass


# -- child processes ------------------------------------------------------------------------------
_BOOT = "from appliance import offline\noffline.install()\n"

_CONVERT_CODE = _BOOT + """import runpy, sys
from pathlib import Path
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(script).parent))
runpy.run_path(script, run_name="__main__")
"""

_QUANTIZE_CODE = _BOOT + """import ctypes, sys
import llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = nthread
sys.exit(1 if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) else 0)
"""

_PROBE_CODE = _BOOT + """import json, math, sys
import llama_cpp
path, request, result = sys.argv[1:4]
req = json.loads(open(request, encoding="utf-8").read())
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
vocab = llama_cpp.llama_model_get_vocab(llm.model)
tokens = llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=True)
llm.eval(tokens[:16])
row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
n_vocab = llm.n_vocab()
finite = all(math.isfinite(row[i]) for i in range(n_vocab))
out = {"tokens": tokens, "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
       "eos": int(llama_cpp.llama_vocab_eos(vocab)), "n_vocab": n_vocab, "finite_logits": finite,
       "eog": {str(i): bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in req["stop_ids"]}}
open(result, "w", encoding="utf-8").write(json.dumps(out))
"""


def _child_env() -> dict[str, str]:
    import appliance

    env = {**os.environ, **offline.OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    root = str(Path(appliance.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class ChildResult:
    returncode: int
    tail: list[str]

    def text(self) -> str:
        return "\n".join(self.tail)


def _run_python(code: str, args: Sequence[str], progress: LineSink, *, what: str,
                timeout: float | None = None) -> ChildResult:
    """Run `code` in a fresh interpreter; stream its merged output lines to `progress`. Past
    `timeout` seconds the child is killed and an ApplianceError names `what` timed out."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    fired = threading.Event()
    with subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                          encoding="utf-8", errors="replace", env=_child_env()) as proc:

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill) if timeout else None
        try:
            if timer:
                timer.start()
            assert proc.stdout is not None
            for raw in proc.stdout:  # text mode turns tqdm's \r updates into lines too
                line = raw.rstrip()
                if line:
                    tail.append(line)
                    progress(line)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
        finally:
            if timer:
                timer.cancel()
    if fired.is_set():
        raise ApplianceError(f"{what} was still running after {timeout:.0f} s and was stopped",
                             title="Timed out", hint="allow more time, or use a smaller model")
    return ChildResult(proc.returncode, list(tail))


# The only counts the tools print: the converter's tqdm bar while it writes (`Writing:  42%|...`;
# before that it reads and plans, with no total) and the quantizer's line per tensor (`[  12/ 272]`).
_WRITING = re.compile(r"^Writing:\s*(\d+)%")
_TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def _counting(say: LineSink, counts: Counts | None) -> LineSink:
    """`say` every line, and pass the counts a line carries to `counts`."""
    if counts is None:
        return say

    def inner(line: str) -> None:
        if written := _WRITING.match(line):
            counts(int(written[1]), 100)
        elif tensor := _TENSOR.match(line):
            counts(int(tensor[1]), int(tensor[2]))
        say(line)

    return inner


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """Yield `<out>.partial`; rename it to `out` on success, remove it on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(out)
    partial.unlink(missing_ok=True)
    try:
        yield partial
        if not partial.is_file():
            raise ApplianceError(f"{partial} was not written", title="GGUF export failed")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


# -- conversion -----------------------------------------------------------------------------------
def _refuse_custom_code(model_dir: Path) -> None:
    """llama.cpp's converter lets some tokenizers run code shipped with the model: never give it any."""
    for name in ("config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file() and "auto_map" in json.loads(path.read_text(encoding="utf-8")):
            raise RefusedError(f"{path} declares custom code (auto_map); the appliance never runs "
                               "code that ships with a model")


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _has_type(node: Any, kind: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    children = node.get("pretokenizers") or node.get("decoders") or []
    return any(_has_type(child, kind) for child in children)


def normalized_tokenizer_json(data: dict[str, Any]) -> dict[str, Any] | None:
    """A plain byte-level copy of a byte-level BPE that carries SentencePiece-style leftovers
    (byte_fallback, a ByteFallback/Fuse/Replace decoder chain), or None when there is nothing to
    undo or undoing it could change tokenization. Byte fallback only ever emits `<0xNN>` tokens
    (all of a character's bytes, or else the unknown token), so without such tokens in the
    vocabulary it is a no-op, and so are the decoder steps that handle them."""
    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    if not (model.get("type") == "BPE" and model.get("byte_fallback")
            and _has_type(data.get("pre_tokenizer"), "ByteLevel")
            and decoder.get("type") == "Sequence" and _has_type(decoder, "ByteLevel")):
        return None
    if any(_BYTE_TOKEN.fullmatch(token) for token in model.get("vocab") or {}):
        return None  # <0xNN> tokens exist: byte fallback may really be used
    return {**data, "model": {**model, "byte_fallback": False}, "decoder": dict(_BYTE_LEVEL)}


@contextlib.contextmanager
def _converter_source(model_dir: Path, scratch: Path, card: str | None = None) -> Iterator[Path]:
    """The folder the converter reads: `model_dir` itself, or a staging view of it (symlinks)
    whose tokenizer.json is normalized, or that leaves out a tokenizer.model that is not
    SentencePiece (see the module docstring). The model folder is never modified."""
    tok_path = model_dir / "tokenizer.json"
    fixed = normalized_tokenizer_json(json.loads(tok_path.read_text(encoding="utf-8"))) \
        if tok_path.is_file() else None
    sp_path = model_dir / "tokenizer.model"
    hidden = {"tokenizer.model"} if sp_path.is_file() and tok_path.is_file() \
        and modelio.sentencepiece_problem(sp_path) is not None else set()
    if fixed is None and not hidden and card is None:
        yield model_dir
        return
    replaced = hidden | ({"tokenizer.json"} if fixed is not None else set()) | \
        ({"README.md"} if card is not None else set())
    with tempfile.TemporaryDirectory(prefix=".gguf-src-", dir=scratch) as tmp:
        stage = Path(tmp)
        for item in model_dir.iterdir():
            if item.is_file() and item.name not in replaced:
                (stage / item.name).symlink_to(item.resolve())
        if fixed is not None:
            (stage / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False),
                                                  encoding="utf-8")
        if card is not None:  # the converter reads general.license from the model card only
            (stage / "README.md").write_text(card, encoding="utf-8")
        yield stage


def _conversion_error(model_dir: Path, result: ChildResult) -> ApplianceError:
    text = result.text()
    if "BPE pre-tokenizer was not recognized" in text:
        found = re.search(r"chkhsh:\s*([0-9a-f]{16,})", text)
        digest = f" (tokenizer hash {found.group(1)[:16]}...)" if found else ""
        return RefusedError(
            f"{model_dir}: llama.cpp's GGUF converter does not recognise this model's tokenizer"
            f"{digest}; it would not know how to split text the way the model was trained, so no "
            "GGUF was written",
            title="Tokenizer not supported by llama.cpp",
            hint="GGUF export needs a tokenizer llama.cpp knows (Llama 3, Qwen2, SmolLM, Mistral, "
            "GPT-2 and other families it lists): fine-tune a base model from such a family, or "
            "update the converter with a newer llama-cpp-python (make setup); ONNX export does not "
            "have this limit")
    if re.search(r"Model \S+ is not supported", text):
        return RefusedError(f"{model_dir}: llama.cpp's converter does not support this architecture"
                            f"\n{text}", title="GGUF export failed")
    return ApplianceError(f"{model_dir}: llama.cpp's GGUF converter failed (exit code "
                          f"{result.returncode}); its last output:\n{text}", title="GGUF export failed")


def convert(model_dir: Path, out: Path, *, outtype: str = "f16", progress: LineSink | None = None,
            timeout: float | None = None, counts: Counts | None = None,
            metadata: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Path:
    """Convert an HF folder to one GGUF file with llama.cpp's converter; returns `out`. `counts`
    gets the percentage written (of 100) once the converter starts writing. `metadata` is (model
    card front matter, e.g. {"license": "apache-2.0"}; the converter's --metadata override, e.g.
    general.base_models / general.datasets): lineage and licence written into the GGUF."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise ValidationError(f"unknown GGUF output type {outtype!r}", hint="one of " + ", ".join(OUTTYPES))
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValidationError(f"{model_dir} is not an HF model folder (no config.json)")
    _refuse_custom_code(model_dir)
    script = stack.converter_dir() / "convert_hf_to_gguf.py"
    out = Path(out)
    say = progress or _quiet
    card, override = metadata or ({}, {})
    card_text = ("---\n" + "".join(f"{k}: {json.dumps(v)}\n" for k, v in card.items()) + "---\n") \
        if card else None
    with _writing(out) as partial, _converter_source(model_dir, out.parent, card_text) as source, \
            tempfile.TemporaryDirectory(prefix=".gguf-meta-", dir=out.parent) as meta_dir:
        say(f"converting {model_dir} to GGUF ({outtype})")
        args = [str(script), str(source), "--outfile", str(partial), "--outtype", outtype]
        if override:
            meta_file = Path(meta_dir) / "metadata.json"
            meta_file.write_text(json.dumps(override), encoding="utf-8")
            args += ["--metadata", str(meta_file)]
        result = _run_python(_CONVERT_CODE, args, _counting(say, counts),
                             what="llama.cpp's GGUF converter", timeout=timeout)
        if result.returncode != 0:
            raise _conversion_error(model_dir, result)
    return out


# -- quantization ---------------------------------------------------------------------------------
def _ftype_table() -> dict[str, int]:
    import llama_cpp

    table = {name.removeprefix("LLAMA_FTYPE_MOSTLY_"): int(value) for name, value in vars(llama_cpp).items()
             if name.startswith("LLAMA_FTYPE_MOSTLY_")}
    table["F32"] = int(llama_cpp.LLAMA_FTYPE_ALL_F32)
    return table


def quant_types() -> dict[str, int]:
    """Quantization types the appliance offers: name -> llama_ftype, from llama_cpp's own table
    (those in NEEDS_IMATRIX only with an importance matrix: `export.imatrix`)."""
    return {name: value for name, value in sorted(_ftype_table().items()) if name not in NOT_OFFERED}


# An importance matrix is made for the types below 6 bits: at 6 bits and more the rounding error it
# steers is already small (llama.cpp's tables), and those types keep the C API path.
SIX_BITS_AND_MORE = frozenset({"F32", "F16", "BF16", "Q8_0", "Q6_K"})


def imatrix_helps(name: str) -> bool:
    """Whether `--imatrix auto` makes an importance matrix for this (canonical) type."""
    return name not in SIX_BITS_AND_MORE


def resolve_quant_type(name: str) -> tuple[str, int]:
    """Canonical name and llama_ftype for a type name (any case; Q4_K means Q4_K_M)."""
    key = name.strip().upper().replace("-", "_")
    key = QUANT_ALIASES.get(key, key)
    offered = quant_types()
    if key in offered:
        return key, offered[key]
    valid = ", ".join(offered)
    if key in NOT_OFFERED:
        raise RefusedError(f"{key} is only meant for {NOT_OFFERED[key]}", hint=f"offered: {valid}")
    raise ValidationError(f"unknown quantization type {name!r}", hint=f"valid types: {valid}")


def refuse_without_imatrix(name: str) -> None:
    """A type llama.cpp quantizes well only with an importance matrix (NEEDS_IMATRIX): refused
    where none will be used, saying how to get one."""
    if name in NEEDS_IMATRIX:
        raise RefusedError(f"{name} needs an importance matrix (imatrix): without one these very "
                           "low-bit types lose too much quality",
                           hint="export with --imatrix auto (the default; it needs llama.cpp's tools, "
                                "which set-up builds) or --imatrix FILE; or use Q4_K_M, IQ4_XS or "
                                "Q3_K_M, which need none")


def quantize(src: Path, dst: Path, qtype: str, *, nthread: int | None = None,
             progress: LineSink | None = None, timeout: float | None = None,
             counts: Counts | None = None) -> Path:
    """Quantize a GGUF (F16/BF16/F32) to `qtype` with llama.cpp's C API; returns `dst`. `counts`
    gets the tensors done of the file's total, as llama.cpp goes.

    K-quant rows whose width is not a multiple of 256 fall back to a nearby type (llama.cpp warns
    per tensor); that is expected on small models."""
    name, ftype = resolve_quant_type(qtype)
    refuse_without_imatrix(name)  # llama_model_quantize would stop at the first such tensor
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ValidationError(f"{src} does not exist")
    if src.resolve() == dst.resolve():
        raise ValidationError(f"{src}: quantizing needs a different output file")
    say = progress or _quiet
    with _writing(dst) as partial:
        say(f"quantizing {src.name} to {name}")
        args = [str(src), str(partial), str(ftype), str(nthread or 0)]
        result = _run_python(_QUANTIZE_CODE, args, _counting(say, counts),
                             what=f"quantization to {name}", timeout=timeout)
        if result.returncode != 0:
            raise ApplianceError(f"{src}: llama.cpp could not quantize it to {name} (exit code "
                                 f"{result.returncode}); its last output:\n{result.text()}",
                                 title="Quantization failed")
    return dst


# -- checks ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatSpec:
    """What a GGUF of this model must carry: the chat template and the stop tokens."""

    template: str
    stop_token_ids: tuple[int, ...]
    stop_tokens: tuple[str, ...]
    supports_system: bool = True


def chat_spec(model_dir: Path, tokenizer: Any = None) -> ChatSpec:
    """The model's recorded chat template and stop tokens (its manifest), or, for a plain HF
    folder, what its tokenizer and configs say."""
    model_dir = Path(model_dir)
    if (model_dir / "manifest.json").is_file():
        from appliance import manifest

        info = manifest.read(model_dir).get("info") or {}
        if info.get("chat_template") and info.get("stop_token_ids"):
            return ChatSpec(info["chat_template"], tuple(info["stop_token_ids"]),
                            tuple(info.get("stop_tokens") or ()), bool(info.get("supports_system", True)))

    tokenizer = tokenizer if tokenizer is not None else hfmodel.load_tokenizer(model_dir)
    if not tokenizer.chat_template:
        raise ValidationError(f"{model_dir} has no chat template")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    stops = hfmodel.stop_token_ids(model_dir, config, tokenizer)
    return ChatSpec(tokenizer.chat_template, tuple(stops), tuple(tokenizer.convert_ids_to_tokens(stops)))


def read_metadata(path: Path) -> dict[str, Any]:
    """GGUF metadata (appliance.modelio.gguf_metadata); an unreadable file is an IntegrityError."""
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"{path} does not exist")
    try:
        return modelio.gguf_metadata(path)
    except ValidationError as exc:
        raise IntegrityError(exc.message, hint="the file is truncated or corrupt; export it again") from None


def _probe_messages(spec: ChatSpec) -> list[dict[str, str]]:
    return list(hfmodel.PROBE if spec.supports_system else hfmodel.PROBE[1:])


def _llama_probe(path: Path, text: str, stop_ids: Sequence[int]) -> dict[str, Any]:
    """Load `path` in llama.cpp (child process), tokenize `text`, run a few tokens through it."""
    with tempfile.TemporaryDirectory(prefix="gguf-probe-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"text": text, "stop_ids": list(stop_ids)}), encoding="utf-8")
        child = _run_python(_PROBE_CODE, [str(path), str(request), str(result)], _quiet,
                            what=f"the llama.cpp check of {path.name}")
        if child.returncode != 0 or not result.is_file():
            how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit code {child.returncode}"
            raise IntegrityError(f"{path}: llama.cpp cannot load or run this file ({how}); its last "
                                 f"output:\n{child.text()}",
                                 hint="the file is truncated, corrupt or not a model llama.cpp "
                                 "supports; export it again")
        return json.loads(result.read_text(encoding="utf-8"))


def _check_metadata(path: Path, meta: dict[str, Any], spec: ChatSpec) -> None:
    template = meta.get("tokenizer.chat_template")
    if template != spec.template:
        at = -1 if template is None else next(
            (i for i, (a, b) in enumerate(zip(template, spec.template)) if a != b),
            min(len(template), len(spec.template)))
        raise IntegrityError(f"{path}: field tokenizer.chat_template is not the model's chat template ("
                             + ("missing" if at < 0 else f"they differ from character {at} on") + ")",
                             hint="export the model again; check chat_template.jinja in its folder")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is None or int(eos) not in spec.stop_token_ids:
        raise IntegrityError(f"{path}: field tokenizer.ggml.eos_token_id is {eos}, not one of the "
                             f"model's stop tokens {list(spec.stop_token_ids)}",
                             hint="fix eos_token_id in the model's generation_config.json/config.json")


def _check_runtime(path: Path, runtime: dict[str, Any], spec: ChatSpec, tokenizer: Any,
                   text: str) -> list[int]:
    not_eog = [i for i in spec.stop_token_ids if not runtime["eog"].get(str(i))]
    if not_eog:
        raise IntegrityError(f"{path}: stop token id(s) {not_eog} do not end generation in llama.cpp;"
                             " a chat would run past the end of the answer")
    if not runtime["finite_logits"]:
        raise IntegrityError(f"{path}: llama.cpp computes non-finite logits with this file")
    ours = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    theirs = list(runtime["tokens"])
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise IntegrityError(f"{path}: llama.cpp tokenizes a chat differently from the model's tokenizer"
                             f" from token {at} on (llama.cpp {theirs[at:at + 5]}, HF {ours[at:at + 5]}"
                             f"; field tokenizer.ggml.pre)", hint="this tokenizer does not survive GGUF "
                             "conversion; use ONNX export or a model family llama.cpp supports")
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("Hello")["input_ids"]
    hf_bos = len(full) > len(plain) and full[:1] == [tokenizer.bos_token_id]
    if hf_bos != runtime["add_bos"]:
        raise IntegrityError(f"{path}: field tokenizer.ggml.add_bos_token is {runtime['add_bos']} but the"
                             f" model's tokenizer {'adds' if hf_bos else 'does not add'} a BOS token")
    return ours


def check_gguf(path: Path, model_dir: Path, *, spec: ChatSpec | None = None, tokenizer: Any = None,
               meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a GGUF against the model it came from; raises IntegrityError naming file and field.

    Checks: metadata readable; tokenizer.chat_template identical; EOS one of the model's stop
    tokens; each stop token ends generation in llama.cpp; the file loads and computes finite
    logits; llama.cpp tokenizes a rendered chat (and awkward text) exactly like the HF tokenizer;
    the BOS policy agrees. Returns a summary for the manifest. `meta` is the file's metadata if
    the caller has already read it (reading a GGUF's token tables takes a second or two)."""
    from appliance import chat

    path, model_dir = Path(path), Path(model_dir)
    tokenizer = tokenizer if tokenizer is not None else hfmodel.load_tokenizer(model_dir)
    spec = spec or chat_spec(model_dir, tokenizer)
    meta = meta if meta is not None else read_metadata(path)
    _check_metadata(path, meta, spec)
    text = chat.render(tokenizer, _probe_messages(spec), template=spec.template) + PARITY_TEXT
    runtime = _llama_probe(path, text, spec.stop_token_ids)
    ids = _check_runtime(path, runtime, spec, tokenizer, text)
    arch = meta.get("general.architecture")
    return {
        "file": path.name, "size": path.stat().st_size, "architecture": arch,
        "file_type": meta.get("general.file_type"), "parameters": meta.get("_parameters"),
        "context_length": meta.get(f"{arch}.context_length"),
        "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                      "add_bos": runtime["add_bos"], "tokens_compared": len(ids)},
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "stop_token_ids": list(spec.stop_token_ids),
    }


# -- scoring and generation -----------------------------------------------------------------------
class GgufLM:
    """A GGUF in llama.cpp for scoring and greedy generation. Logits are computed only at the
    positions asked for (`logits_at`): llama.cpp then skips the output layer elsewhere, and no
    context-sized [n_ctx, vocab] buffer is kept (logits_all would hold 200 MB for SmolLM2 at 1k)."""

    def __init__(self, path: Path, n_ctx: int = 2048, n_threads: int | None = None,
                 n_gpu_layers: int = 0) -> None:
        import llama_cpp

        self.path = Path(path)
        self.n_ctx = n_ctx
        from appliance.runtime.template import check_gguf_templates

        check_gguf_templates(self.path)  # Llama() compiles the file's templates with unbounded Jinja
        try:
            self._llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=n_threads,
                                        n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers,
                                        verbose=False)
        except ValueError as exc:
            raise IntegrityError(f"{self.path}: llama.cpp cannot load it: {exc}") from None
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(vocab))
        self.n_vocab = int(self._llm.n_vocab())

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids; a BOS is prepended only if the GGUF says add_bos and the text lacks one."""
        ids = list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _decode(self, ids: Sequence[int], start: int, want: Sequence[int]) -> Any:
        from appliance.runtime.llama_batch import decode_at

        return decode_at(self._llm, ids, start, want)

    def logits_at(self, ids: Sequence[int], positions: Sequence[int]) -> Any:
        """float32 array [len(positions), vocab]: the logits after each of `positions` (ascending)
        of `ids`, evaluated from an empty cache."""
        return self._decode(ids, 0, list(positions))

    def logits(self, ids: Sequence[int]) -> Any:
        """float32 array [len(ids), vocab]: the logits after each position."""
        return self._decode(ids, 0, range(len(ids)))

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int]) -> list[int]:
        """Greedy continuation of `ids`; stops before a stop id (not included) or at the limit."""
        import numpy as np

        stops = set(stop_ids)
        row = self._decode(ids, 0, [len(ids) - 1])[0]
        n, out = len(ids), list[int]()
        while len(out) < max_new_tokens:
            nxt = int(np.argmax(row))
            if nxt in stops:
                break
            out.append(nxt)
            if len(out) == max_new_tokens or n >= self.n_ctx:
                break
            row = self._decode([nxt], n, [n])[0]
            n += 1
        return out

    def close(self) -> None:
        self._llm.close()

    def __enter__(self) -> GgufLM:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
