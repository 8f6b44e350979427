"""Chat messages to one prompt string.

Why it exists: a chat request is a list of ``{role, content}`` messages; the model reads one token sequence. A
tokenizer that carries a Jinja chat template (Hugging Face's ``tokenizer_config.json`` ``chat_template``, or a
``--chat-template`` file) renders them as it was trained to read them. Without one the default template is::

    <role>: <content>\\n        (one line per message, in order)
    assistant:                  (the generation prompt)

which suits a base model; a chat-tuned model should ship its own template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcore.errors import UserError
from mcore.hf import model_file


def default_render(messages: Sequence[dict[str, str]]) -> str:
    """The default template (see the module docstring)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def tokenizer_template(tokenizer: Any) -> str | None:
    """The Jinja template a tokenizer carries: its ``chat_template`` attribute, or ``chat_template`` in the
    ``tokenizer_config.json`` beside its ``tokenizer.json``; None when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        return template
    path = getattr(tokenizer, "path", None)
    if path is None:
        return None
    directory = Path(path).parent if Path(path).is_file() else Path(path)
    if not (directory / "tokenizer_config.json").is_file():
        return None
    config = model_file(directory, "tokenizer_config.json")  # a link out of the tokenizer's directory is refused
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    value = data.get("chat_template") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def _raise(message: str) -> None:
    raise ValueError(message)


#: The longest string or list one ``*`` in a chat template may build (``{{ 'x' * 10**10 }}`` took 24 GB of memory,
#: found by trying it); a prompt longer than this is beyond any model's context anyway.
MAX_TEMPLATE_REPEAT = 1 << 22


def _sandbox() -> Any:
    """Jinja's immutable sandbox, with ``*`` and ``**`` bounded (the sandbox bounds ``range`` itself)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    sized = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                    if sized and len(seq) * count > MAX_TEMPLATE_REPEAT:
                        raise ValueError(f"the template repeats a value to over {MAX_TEMPLATE_REPEAT} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise ValueError("the template raises to a power above 64")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox(trim_blocks=True, lstrip_blocks=True)


class ChatTemplate:
    """Render messages with a Jinja ``template`` (None: the default template)."""

    def __init__(self, template: str | None = None, *, eos_token: str = "", bos_token: str = "") -> None:
        self.source = template
        self.eos_token, self.bos_token = eos_token, bos_token
        self._compiled: Any = None
        if template is not None:
            try:
                from jinja2 import TemplateError
            except ImportError:
                raise UserError("a chat template needs jinja2: pip install jinja2") from None
            env = _sandbox()
            env.globals["raise_exception"] = _raise
            try:
                self._compiled = env.from_string(template)
            except TemplateError as exc:
                raise UserError(f"the chat template does not parse: {exc}") from None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt for ``messages``, ending with the assistant's generation prompt. A template that fails on
        these messages raises a one-line ``UserError``."""
        if self._compiled is None:
            return default_render(messages)
        try:
            return str(
                self._compiled.render(
                    messages=list(messages),
                    add_generation_prompt=True,
                    eos_token=self.eos_token,
                    bos_token=self.bos_token,
                )
            )
        except Exception as exc:  # jinja raises TemplateError, and templates call raise_exception
            raise UserError(f"the chat template failed on these messages: {exc}") from None
