"""One chat template, end to end: render a conversation and build its training labels.

`render_and_mask` is the single function that turns `messages` into token ids and labels. Training
uses it, dataset import measures lengths with it, and exports are checked against the same ids.
Every render goes through the runtime's bounded `ChatTemplate` (transformers' semantics, but with
limits on output, memory and work), never through transformers' unbounded Jinja environment.
The loss mask keeps exactly the assistant tokens and the stop token that ends each assistant turn;
everything else (system, user, the template's role headers, anything after the stop token such as a
trailing newline) is -100.

How spans are found: the conversation is rendered once in full, and for each assistant turn the
template is rendered up to that turn with the generation prompt (the prefix) and including that
turn. The text between the two is the assistant turn; it ends at the last stop token inside it. The
full text is tokenized once, with character offsets, so the ids are exactly those any runtime gets
for the same text. A template whose partial renders are not prefixes of the full render (for
example one that rewrites earlier turns) is refused with a clear error instead of masking wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.errors import ValidationError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class TemplateError(ValidationError):
    """A template that fails or is refused; `bound` names the render limit that stopped it, if any
    (a `RenderLimits` field such as "output_chars")."""

    title = "Chat template problem"

    def __init__(self, message: str, *, hint: str | None = None, bound: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.bound = bound


@dataclass
class Rendered:
    text: str
    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(default_factory=list)  # character spans that are trained

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], *, generation_prompt: bool = False,
           template: str | None = None, origin: str | None = None) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False)`, rendered by the runtime's bounded
    ChatTemplate (same environment, same variables, so the same text; transformers' own Jinja
    environment has no bound on output or work, and a template is untrusted input). `origin` names
    the template in errors (default: the tokenizer's folder)."""
    from appliance.runtime.template import ChatTemplate, TemplateRenderError

    origin = origin or ("the given chat template" if template is not None else
                        f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}")
    try:
        source = tokenizer.get_chat_template(template)
    except ValueError as exc:  # no template at all, or a named one that does not exist
        raise TemplateError(f"{origin}: {exc}") from None
    try:
        return ChatTemplate(source, tokenizer.special_tokens_map, origin=origin).render(
            messages, generation_prompt=generation_prompt)
    except TemplateRenderError as exc:
        raise TemplateError(exc.message, hint=exc.hint, bound=exc.bound) from None


def assistant_spans(tokenizer: Any, messages: Sequence[dict[str, str]], stop_tokens: Sequence[str],
                    template: str | None = None, origin: str | None = None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """The full text and, per assistant turn, the [start, end) characters trained on."""
    full = render(tokenizer, messages, template=template, origin=origin)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True, template=template, origin=origin)
        upto = render(tokenizer, messages[: i + 1], template=template, origin=origin)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise TemplateError(
                f"the chat template is not prefix-stable at message {i} (assistant): rendering "
                "the conversation turn by turn does not reproduce the full rendering, so the "
                "assistant tokens cannot be located",
                hint="use a template that renders earlier turns unchanged "
                "(supply one with --chat-template FILE)",
            )
        turn = upto[len(prefix):]
        end = max((turn.rfind(s) + len(s) for s in stop_tokens if s and s in turn), default=-1)
        if end < 0:
            raise TemplateError(
                f"the chat template does not end assistant turn {i} with a stop token "
                f"({', '.join(map(repr, stop_tokens))}); a model trained on it would never stop",
                hint="check the model's EOS token, or supply a template with --chat-template FILE",
            )
        spans.append((len(prefix), len(prefix) + end))
    return full, spans


def render_and_mask(tokenizer: Any, messages: Sequence[dict[str, str]],
                    stop_tokens: Sequence[str], template: str | None = None,
                    origin: str | None = None) -> Rendered:
    """Token ids of the rendered conversation and labels that train only assistant turns."""
    text, spans = assistant_spans(tokenizer, messages, stop_tokens, template, origin)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, _end) in enumerate(encoded["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[j] = ids[j]
    return Rendered(text=text, input_ids=ids, labels=labels, spans=spans)


def count_tokens(tokenizer: Any, messages: Sequence[dict[str, str]],
                 template: str | None = None) -> int:
    text = render(tokenizer, messages, template=template)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
