"""Importance-matrix (imatrix) GGUF quantization with llama.cpp's own tools.

Why it is built this way:
- llama.cpp's C API takes an importance matrix only as a C++ `std::unordered_map` inside
  `llama_model_quantize_params`, which ctypes cannot build; its `llama-imatrix` and
  `llama-quantize` tools compute and apply one. Set-up builds both from the same llama-cpp-python
  sdist the runtime comes from, linked against the libllama/libggml the installed `llama_cpp`
  package ships (`appliance.stack.llama_tool`), so file format and runtime agree as they do for
  the converter.
- The tools run as child processes with the wheel's lib/ on LD_LIBRARY_PATH (their runpath names
  it too), the offline environment, and no `LLAMA_ARG_*` variables: llama.cpp's argument parser
  reads options from those (a model URL among them), and only local files are ever given.
- `llama-imatrix` computes over fixed windows of `chunk` tokens and reports the running perplexity
  after each (`[12]9.87,`), on one line without a newline: the output is read as it comes, not by
  line, so progress is the tool's own chunk count. `--parse-special` makes chat-template markers
  (`<|im_start|>`) the special tokens the model sees, not text (llama-imatrix's default).
- Outputs are written to a `.partial` name and renamed only on success, as in `export.gguf`.
- An imatrix is a GGUF whose `general.type` is `imatrix` (`read_imatrix` checks that, and its
  chunk count and size); `llama-quantize --imatrix` records what it used in the quantized file
  (`quantize.imatrix.*` keys), which is how a test tells that it was used.

Headless; knows no job or stage (the export stage decides when an imatrix is made and from what).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from appliance import modelio, offline, stack
from appliance.errors import ApplianceError, ValidationError

LineSink = Callable[[str], None]
Counts = Callable[[int, int], None]

CHUNK = 512  # llama-imatrix's own default window (tokens), the one its documentation measures with
TAIL_LINES = 30
_STAMP = re.compile(r"^\d+\.\d+\.\d+\.\d+ [DIWE] ")  # llama.cpp's log prefix (time, level)
_TOTAL = re.compile(r"computing over (\d+) chunks")
_DONE = re.compile(r"\[(\d+)\]\d")  # `[12]9.8731,`: chunk 12 done, perplexity so far
_TENSOR = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")  # llama-quantize's line per tensor
# what an operator reads of the tools' output: problems, and the sizes and totals they end with
_WORTH = re.compile(r"error|fail|warn|size\s*=|computing over \d+ chunks|^Final estimate", re.IGNORECASE)


def _quiet(_: str) -> None:
    pass


def tool_env() -> dict[str, str]:
    """The tools' environment: the wheel's libraries findable, offline, no LLAMA_ARG_* options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(offline.OFFLINE_ENV)
    lib = stack.llama_lib_dir()
    if lib is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(lib), env.get("LD_LIBRARY_PATH")) if p)
    return env


def _pieces(fd: int) -> Iterator[tuple[list[str], str]]:
    """(complete lines, the unfinished last line) after each read of `fd`, until it closes."""
    buf = b""
    while chunk := os.read(fd, 1 << 16):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield [line.decode("utf-8", "replace").rstrip() for line in lines], \
            buf.decode("utf-8", "replace")
    if buf:
        yield [buf.decode("utf-8", "replace").rstrip()], ""


def run_tool(cmd: Sequence[str], on_line: LineSink, on_partial: LineSink | None = None,
             ) -> tuple[int, list[str]]:
    """Run one of the tools; each output line (stdout and stderr) goes to `on_line`, the line
    being written to `on_partial`. Returns (exit code, last lines). Anything raised meanwhile (a
    job's cancel) kills the tool first."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, env=tool_env()) as proc:
        try:
            assert proc.stdout is not None
            for lines, partial in _pieces(proc.stdout.fileno()):
                for line in (_STAMP.sub("", line) for line in lines):
                    if line.strip():
                        tail.append(line)
                        on_line(line)
                if on_partial is not None and partial:
                    on_partial(partial)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, list(tail)


def tool_version() -> str:
    """`llama-imatrix --version`: the llama.cpp version and the build set-up gave it."""
    code, tail = run_tool([str(stack.llama_tool("llama-imatrix")), "--version"], _quiet)
    found = [line for line in tail if line.startswith(("version:", "built with"))]
    return "; ".join(found) if code == 0 and found else "unknown"


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """`<stem>.partial<suffix>` (llama-imatrix picks its format by the suffix), renamed to `out`
    on success, removed on any failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f"{out.stem}.partial{out.suffix}")
    partial.unlink(missing_ok=True)
    try:
        yield partial
        if not partial.is_file():
            raise ApplianceError(f"{partial} was not written", title="GGUF export failed")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def read_imatrix(path: Path) -> dict[str, Any]:
    """What an imatrix file says of itself (chunks, chunk size, datasets, entries); a file that is
    not a GGUF imatrix is a ValidationError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"{path}: no such importance-matrix file")
    try:
        meta = modelio.gguf_metadata(path)
    except ValidationError:
        meta = {}
    if meta.get("general.type") != "imatrix":
        raise ValidationError(f"{path} is not an importance matrix (a GGUF whose general.type is "
                              "imatrix, as llama-imatrix writes)",
                              hint="make one with llama-imatrix, or leave --imatrix at auto to make "
                                   "one from the run's training conversations")
    return {"chunks": meta.get("imatrix.chunk_count"), "chunk_size": meta.get("imatrix.chunk_size"),
            "datasets": list(meta.get("imatrix.datasets") or []),
            "entries": int(meta.get("_tensor_count") or 0) // 2}  # in_sum2 and counts per tensor


class _ChunkCount:
    """Progress of llama-imatrix: its total from `computing over N chunks`, then `[k]` markers."""

    def __init__(self, counts: Counts | None) -> None:
        self.counts, self.total = counts, 0

    def __call__(self, text: str) -> None:
        if found := _TOTAL.search(text):
            self.total = int(found[1])
        done = [int(n) for n in _DONE.findall(text)]
        if self.counts is not None and self.total and done:
            self.counts(min(max(done), self.total), self.total)


def _imatrix_line(say: LineSink, count: _ChunkCount) -> LineSink:
    """Count every line; say only the ones an operator reads (not the loader's, the tokenizer's
    timings, the ETA or the running perplexities: a failure's message carries the tool's last lines)."""
    def inner(line: str) -> None:
        count(line)
        if _WORTH.search(line):
            say(line)
    return inner


def compute(model: Path, text_file: Path, out: Path, *, chunk: int = CHUNK, threads: int | None = None,
            progress: LineSink | None = None, counts: Counts | None = None) -> dict[str, Any]:
    """An importance matrix of `model` (a GGUF, F16 or better) over the text in `text_file`, in
    windows of `chunk` tokens, written to `out`; returns `read_imatrix(out)`. `counts` gets the
    chunks done of the total, as the tool goes. Needs at least 2 x `chunk` tokens of text."""
    say = progress or _quiet
    count = _ChunkCount(counts)
    with _writing(Path(out)) as partial:
        cmd = [str(stack.llama_tool("llama-imatrix")), "-m", str(model), "-f", str(text_file),
               "-o", str(partial), "-c", str(chunk), "--parse-special"]
        if threads:
            cmd += ["-t", str(threads)]
        say(f"computing an importance matrix of {Path(model).name} over {Path(text_file).name}")
        code, tail = run_tool(cmd, _imatrix_line(say, count), count)
        if code != 0:
            raise ApplianceError(f"llama-imatrix failed on {model} (exit code {code}); its last "
                                 "output:\n" + "\n".join(tail), title="Importance matrix failed")
    return read_imatrix(Path(out))


def _quantize_line(say: LineSink, counts: Counts | None) -> LineSink:
    """Count the tensors; say problems and the sizes, not the tool's banner and loader lines."""
    def inner(line: str) -> None:
        if tensor := _TENSOR.match(line):
            if counts is not None:
                counts(int(tensor[1]), int(tensor[2]))
            return
        if _WORTH.search(line):
            say(line)
    return inner


def quantize(src: Path, dst: Path, ftype: int, name: str, imatrix: Path, *, nthread: int | None = None,
             progress: LineSink | None = None, counts: Counts | None = None) -> Path:
    """Quantize a GGUF (F16/BF16/F32) to llama_ftype `ftype` (named `name`) with `llama-quantize
    --imatrix`; returns `dst`. `counts` gets the tensors done of the file's total."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ValidationError(f"{src} does not exist")
    if src.resolve() == dst.resolve():
        raise ValidationError(f"{src}: quantizing needs a different output file")
    say = progress or _quiet
    with _writing(dst) as partial:
        say(f"quantizing {src.name} to {name} with the importance matrix {Path(imatrix).name}")
        cmd = [str(stack.llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(src),
               str(partial), str(ftype), *([str(nthread)] if nthread else [])]
        code, tail = run_tool(cmd, _quantize_line(say, counts))
        if code != 0:
            raise ApplianceError(f"{src}: llama-quantize could not quantize it to {name} with "
                                 f"{imatrix} (exit code {code}); its last output:\n" + "\n".join(tail),
                                 title="Quantization failed")
    return dst
