"""`appliance chat ARTIFACT`: a multi-turn, streaming chat in the terminal (or over a pipe).

Why it is shaped this way: the REPL (`ChatSession`) only talks to a `ChatEngine` and to three
callables (read a line, write answer text, write a notice), so the unit tests drive it with a fake
engine and scripted input, and the same code serves a terminal and a pipe. Answers go to stdout,
notices and errors to stderr, so `appliance chat X < questions.txt > answers.txt` keeps the answers
clean.

Promises:
- Ctrl-C during an answer stops that answer (SIGINT sets the engine's cancel event), keeps the
  partial answer in the history marked `interrupted`, and returns to the prompt; Ctrl-C at the
  prompt does not leave the chat (/quit or Ctrl-D does).
- Context policy (the engine itself is strict): before each answer, the oldest exchanges are
  dropped until the prompt plus room for the answer (max_tokens, else a quarter of the context,
  at most 512 tokens) fits; the system prompt is kept, and a notice says how many were dropped.
- `/save FILE` writes a JSON transcript (artifact, settings, system prompt, messages) atomically.

Only the standard library at module scope: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from appliance.runtime import add_device_arguments, gpu_wanted

HELP = """commands:
  /help               this list
  /reset              forget the conversation (the system prompt stays)
  /system TEXT        set the system prompt (/system alone shows it, /system - removes it)
  /set KEY VALUE      temperature, top_p, top_k, repeat_penalty, max_tokens, seed, stop
                      (max_tokens/seed/stop: "none" unsets; stop: a string or a JSON list)
  /settings           the artifact and the current settings
  /save FILE          write the transcript as JSON
  /quit               leave (Ctrl-D too)
Ctrl-C stops an answer; a line starting with // sends the text after the first /."""
SETTABLE = ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens", "seed", "stop")
ANSWER_ROOM = 512


def _stdin_line(prompt: str) -> str:
    if sys.stdin.isatty():
        return input(prompt)
    line = sys.stdin.buffer.readline()
    if not line:
        raise EOFError
    return line.decode("utf-8", errors="replace").rstrip("\n")  # bad bytes: U+FFFD, not a crash


def _stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ChatSession:
    """The chat loop over an engine: history, commands, streaming, interruption, context policy."""

    def __init__(self, engine: Any, sampling: Any, *, system: str | None = None, artifact: str = "",
                 read: Callable[[str], str] = _stdin_line, write: Callable[[str], None] = _stdout,
                 notify: Callable[[str], None] = _stderr) -> None:
        self.engine, self.sampling, self.system = engine, sampling, system or None
        self.artifact = artifact or getattr(engine, "name", "")
        self.read, self.write, self.notify = read, write, notify
        self.messages: list[dict[str, Any]] = []  # user/assistant turns; the system prompt apart
        self.cancel = threading.Event()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        self.notify(f"chatting with {self.artifact} ({self.engine.kind}, context "
                    f"{self.engine.context_length} tokens); /help lists the commands")
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                self.notify("\n(/quit or Ctrl-D leaves the chat)")
                continue
            try:
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:  # Ctrl-C outside an answer (reading the prompt, a command)
                self.notify("\n(interrupted; /quit or Ctrl-D leaves the chat)")

    def handle(self, line: str) -> bool:
        """One line of input; False when the chat should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("//"):
            self.ask(text[1:])
            return True
        if text.startswith("/"):
            return self.command(text)
        self.ask(text)
        return True

    # -- commands ------------------------------------------------------------------------------
    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        handlers: dict[str, Callable[[str], None]] = {
            "/help": lambda _: self.notify(HELP), "/reset": self.reset, "/system": self.set_system,
            "/set": self.set_option, "/settings": lambda _: self.notify(self.describe()),
            "/save": self.save}
        handler = handlers.get(name)
        if handler is None:
            self.notify(f"unknown command {name}; /help lists the commands")
        else:
            handler(arg)
        return True

    def reset(self, _: str = "") -> None:
        self.messages.clear()
        self.notify("conversation cleared" + (" (system prompt kept)" if self.system else ""))

    def set_system(self, arg: str) -> None:
        if not arg:
            self.notify(f"system prompt: {self.system!r}" if self.system else "no system prompt")
            return
        self.system = None if arg == "-" else arg
        self.notify("system prompt removed" if self.system is None else "system prompt set")

    def set_option(self, arg: str) -> None:
        from appliance.errors import ApplianceError

        key, _, raw = arg.partition(" ")
        if key not in SETTABLE or not raw.strip():
            self.notify("usage: /set KEY VALUE with KEY one of " + ", ".join(SETTABLE))
            return
        try:
            updated = dataclasses.replace(self.sampling, **{key: _parse_value(key, raw.strip())}).validated()
        except (ApplianceError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            self.notify(f"not set: {exc}")
            return
        self.sampling = updated
        self.notify(f"{key} = {getattr(self.sampling, key)!r}")

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.sampling).items())
        where = "GPU" if getattr(self.engine, "gpu", False) else "CPU"
        threads = getattr(self.engine, "threads", None)
        return (f"artifact: {self.artifact} ({self.engine.kind}, context {self.engine.context_length}, "
                f"{where}{f', {threads} threads' if threads else ''})\n"
                f"system prompt: {self.system!r}\nsettings: {settings}\n"
                f"history: {len(self.messages)} messages")

    def transcript(self) -> dict[str, Any]:
        sampling = dataclasses.asdict(self.sampling)
        sampling["stop"] = list(sampling["stop"])
        return {"artifact": self.artifact, "kind": self.engine.kind, "settings": sampling,
                "system": self.system, "messages": self.conversation(keep_marks=True)}

    def save(self, arg: str) -> None:
        from appliance.fsutil import atomic_write_text

        if not arg:
            self.notify("usage: /save FILE")
            return
        path = Path(arg).expanduser()
        if not path.parent.is_dir():  # a typo in the path is not a request for new folders
            self.notify(f"not saved: {path.parent} is not a folder")
            return
        try:
            atomic_write_text(path, json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            self.notify(f"not saved: {exc}")
            return
        self.notify(f"transcript saved to {path}")

    # -- answering -----------------------------------------------------------------------------
    def conversation(self, keep_marks: bool = False) -> list[dict[str, Any]]:
        turns = [m if keep_marks else {"role": m["role"], "content": m["content"]} for m in self.messages]
        return ([{"role": "system", "content": self.system}] if self.system else []) + turns

    def fit_context(self) -> None:
        """Drop the oldest exchanges until the prompt leaves room for an answer; say so."""
        room = self.sampling.max_tokens or min(ANSWER_ROOM, self.engine.context_length // 4)
        dropped = 0
        while (len(self.messages) > 1 and len(self.engine.prompt_ids(self.conversation())) + room
               > self.engine.context_length):
            cut = next((i for i in range(1, len(self.messages)) if self.messages[i]["role"] == "user"),
                       len(self.messages) - 1)
            dropped += cut
            del self.messages[:cut]
        if dropped:
            self.notify(f"[context full: dropped the {dropped} oldest message(s)"
                        f"{', kept the system prompt' if self.system else ''}]")

    def ask(self, text: str) -> None:
        from appliance.errors import ApplianceError

        self.messages.append({"role": "user", "content": text})
        try:
            self.fit_context()
            stream = self.engine.generate(self.conversation(), self.sampling, self.cancel)
        except (ApplianceError, KeyboardInterrupt) as exc:
            self.messages.pop()
            self.notify(f"error: {exc}" if isinstance(exc, ApplianceError) else "[interrupted]")
            return
        answer, reason = self._stream(stream)
        message: dict[str, Any] = {"role": "assistant", "content": answer}
        if reason == "cancelled":
            message["interrupted"] = True
            self.notify("[interrupted]")
        elif reason == "length":
            self.notify("[stopped: max_tokens reached]")
        self.messages.append(message)

    def _stream(self, stream: Iterator[Any]) -> tuple[str, str]:
        """Write the answer as it comes; (its text, the finish reason)."""
        self.cancel.clear()
        parts: list[str] = []
        reason = "cancelled"
        with SigintCancels(self.cancel):
            try:
                for item in stream:
                    if hasattr(item, "reason"):
                        reason = item.reason
                    elif item.text:
                        parts.append(item.text)
                        self.write(item.text)
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being honoured
                reason = "cancelled"
            except Exception as exc:  # the engine failed mid-answer: say so, stay in the chat
                reason = "cancelled"
                self.notify(f"error: {getattr(exc, 'title', type(exc).__name__)}: {exc}")
            finally:
                close = getattr(stream, "close", None)
                if close:
                    close()
        self.write("\n")
        return "".join(parts), reason


class SigintCancels:
    """While active (main thread only), the first Ctrl-C sets `cancel`; a second one raises."""

    def __init__(self, cancel: threading.Event) -> None:
        self.cancel, self.active = cancel, False
        # the handler it replaced (signal.signal's answer: a function, SIG_DFL/SIG_IGN, or None)
        self.previous: Callable[[int, FrameType | None], Any] | int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.cancel.is_set():
            raise KeyboardInterrupt
        self.cancel.set()

    def __enter__(self) -> SigintCancels:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
            self.active = True
        return self

    def __exit__(self, *_: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def _parse_value(key: str, raw: str) -> Any:
    """A /set value: numbers for numeric keys, "none" to unset, stop as a string or a JSON list."""
    if raw.lower() == "none" and key in ("max_tokens", "seed", "stop"):
        return () if key == "stop" else None
    if key == "stop":
        if raw.startswith("["):
            value = json.loads(raw)
            return tuple(value) if isinstance(value, list) else value
        return (raw,)
    if key in ("top_k", "max_tokens", "seed"):
        return int(raw)
    return float(raw)


# -- the command -----------------------------------------------------------------------------------
def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, (0, 1] (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="llama.cpp-style penalty over the last 64 tokens (default 1 = off)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="per answer (default: the rest of the context)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def register(sub: Any) -> None:
    """Add `appliance chat` to the `appliance` parser."""
    p = sub.add_parser("chat", help="chat with an export or a GGUF model in the terminal",
                       description="Multi-turn streaming chat with a GGUF or ONNX export, or a "
                                   "model imported from a GGUF file. "
                                   "Type /help inside for the commands.")
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="an export or model name (appliance exports list, models list), a .gguf file or an "
                        "ONNX folder")
    p.add_argument("--system", help="system prompt")
    add_sampling_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: half the cores)")
    add_device_arguments(p)
    p.add_argument("--allow-failed-parity", action="store_true",
                   help="open an export whose parity gate failed")
    p.set_defaults(func=cmd_chat)


def sampling_from_args(args: argparse.Namespace) -> Any:
    from appliance.runtime.engine import Sampling

    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    repeat_penalty=args.repeat_penalty, max_tokens=args.max_tokens,
                    seed=args.seed).validated()


def cmd_chat(args: argparse.Namespace) -> int:
    from appliance.runtime.engines import open_engine, resolve
    from appliance.workspace import Workspace

    sampling = sampling_from_args(args)
    home = getattr(args, "home", None)
    artifact = resolve(args.artifact, Workspace(Path(home)) if home else None,
                       allow_failed_parity=args.allow_failed_parity)
    if artifact.parity == "fail":
        _stderr(f"warning: {artifact.name} failed its parity gate (opened with --allow-failed-parity)")
    engine = open_engine(artifact, threads=args.threads, gpu=gpu_wanted(args.device))
    try:
        return ChatSession(engine, sampling, system=args.system, artifact=artifact.name).run()
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m appliance.runtime.console chat ...`: the chat command without the whole CLI (the
    same exit codes, and as quiet when the reader of its answers closes the pipe)."""
    from appliance import offline
    from appliance.cli import quiet_on_closed_pipe, run_command

    offline.install()

    def run() -> int:
        parser = argparse.ArgumentParser(prog="appliance")
        parser.add_argument("--home", help="workspace directory")
        register(parser.add_subparsers(metavar="COMMAND", required=True))
        return run_command(parser.parse_args(argv))

    return quiet_on_closed_pipe(run)


if __name__ == "__main__":
    raise SystemExit(main())
