"""Chat messages -> one prompt string, with a fixed, documented template.

Drover's tiny model has no chat template (a byte-level vocabulary, random weights), so the gateway renders
messages itself, the same way for every model:

    <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}\n ... <|assistant|>\n

one ``<|role|>`` header line per message, its content, a newline, then an open ``<|assistant|>`` header the
model continues. Content may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined);
other part types (images, audio) are refused.
"""

from __future__ import annotations

from typing import Any

from control.apps.gateway.errors import invalid

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def message_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    """The text of one message's ``content``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(
                f"messages[{index}]: only text content parts are supported, got {part.get('type')!r}",
                f"messages[{index}].content",
            )
        texts.append(part["text"])
    return "".join(texts)


def render_chat(messages: list[tuple[str, str]]) -> str:
    """The prompt for ``(role, text)`` messages, ending with the open assistant header."""
    if not messages:
        raise invalid("messages must not be empty", "messages")
    lines = [f"<|{role}|>\n{text}\n" for role, text in messages]
    return "".join(lines) + "<|assistant|>\n"
