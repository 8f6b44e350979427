"""A chat template runs in Jinja's immutable sandbox with its ``*`` and ``**`` bounded: ``{{ 'x' * 10**10 }}`` took
24 GB of memory (found by trying it) and is now a one-line ``UserError`` (a 400 through the server); attribute
tricks stay refused; ordinary templates render as before."""

from __future__ import annotations

import pytest
from mcore_inference.server.chat_template import MAX_TEMPLATE_REPEAT, ChatTemplate

from mcore.errors import UserError

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "source",
    ["{{ 'x' * 10**10 }}", "{{ 10**10 * 'x' }}", "{{ [1] * (2 * 10**7) }}", "{{ 2 ** 100000 }}"],
)
def test_huge_repeats_and_powers_are_refused(source: str) -> None:
    with pytest.raises(UserError, match="the chat template failed on these messages") as err:
        ChatTemplate(source).render(MESSAGES)
    assert "\n" not in str(err.value)


def test_ordinary_templates_and_small_repeats_render() -> None:
    source = "{% for m in messages %}{{ '=' * 3 }}{{ m.role }}:{{ m.content }}{% endfor %}{{ 2 ** 10 }}"
    assert ChatTemplate(source).render(MESSAGES) == "===user:hi1024"
    assert ChatTemplate(f"{{{{ 'ab' * {MAX_TEMPLATE_REPEAT // 2} }}}}").render(MESSAGES) == "ab" * (
        MAX_TEMPLATE_REPEAT // 2
    )


def test_sandbox_escapes_stay_refused() -> None:
    with pytest.raises(UserError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
