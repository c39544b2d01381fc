"""The judge's rubric: the prompt a judge model reads for each pair of answers. The default ships
in the package (`appliance/data/judge-rubric.md`; `appliance evals rubric` prints it), and an
operator's edited copy replaces it (`appliance eval ... --judge J --rubric FILE`).

A rubric is UTF-8 text with placeholders that are filled once per question and order:
`{question}`, `{answer_a}`, `{answer_b}` (required) and `{reference}` (optional). Nothing else in
it is special: other braces stay as written, and an answer that itself contains `{answer_b}` is
not filled again (one pass). Standard library only: the request checks a rubric before its job is
queued.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REQUIRED = ("question", "answer_a", "answer_b")
OPTIONAL = ("reference",)
MAX_BYTES = 64 * 1024
_PLACEHOLDER = re.compile(r"\{(" + "|".join(REQUIRED + OPTIONAL) + r")\}")


@dataclass(frozen=True)
class Rubric:
    text: str
    sha256: str  # of the file's bytes
    origin: str  # "default" or the file's path


def default_text() -> str:
    return (resources.files("appliance") / "data" / "judge-rubric.md").read_text(encoding="utf-8")


def problem(text: str) -> str | None:
    """What makes `text` unusable as a rubric (None: nothing)."""
    if not text.strip():
        return "is empty"
    missing = [f"{{{name}}}" for name in REQUIRED if f"{{{name}}}" not in text]
    if missing:
        return "lacks the placeholder(s) " + ", ".join(missing) + " (see: appliance evals rubric)"
    return None


def file_problem(path: Path) -> str | None:
    """What makes the file unusable as a rubric, naming it (None: nothing)."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            return f"{path} is not a file"
        if size > MAX_BYTES:
            return f"{path} is {size} bytes; a rubric is at most {MAX_BYTES}"
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return f"{path} does not exist"
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    why = problem(text)
    return f"{path} {why}" if why else None


def load(path: str = "") -> Rubric:
    """The rubric at `path` ("" = the default); ValidationError naming the file if unusable."""
    from appliance.errors import ValidationError

    if not path:
        text = default_text()
        return Rubric(text, hashlib.sha256(text.encode("utf-8")).hexdigest(), "default")
    if why := file_problem(Path(path)):
        raise ValidationError(f"rubric {why}", hint="print the default to start from: "
                                                    "appliance evals rubric > rubric.md")
    raw = Path(path).read_bytes()
    return Rubric(raw.decode("utf-8"), hashlib.sha256(raw).hexdigest(), str(path))


def fill(text: str, *, question: str, reference: str, answer_a: str, answer_b: str) -> str:
    """The rubric with its placeholders filled in one pass."""
    values = {"question": question, "reference": reference, "answer_a": answer_a,
              "answer_b": answer_b}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
