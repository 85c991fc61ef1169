"""A generative task's prompts: each row a completion ``prompt`` (text) or a chat
``messages`` (a list of ``{role, content}``; JSON lines or Parquet, where a cell can hold
a list), with an optional ``reference`` answer (gold).

Problems are one line naming the file, the row and the fix (:class:`~distill.tables.TableError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.tables import TableError, read_file
from serving.contracts.generation_records import canonical_prompt
from serving.generate.models import LanguageModel, render_chat, render_completion

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt: exactly one of ``prompt`` and ``messages``, and its gold answer."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    reference: str | None = None

    def chat(self) -> list[dict[str, str]] | None:
        if self.messages is None:
            return None
        return [{"role": role, "content": content} for role, content in self.messages]

    @property
    def split_text(self) -> str:
        """What the split hash reads, as for a logged record: the canonical prompt."""
        chat = self.chat()
        return canonical_prompt(chat if chat is not None else self.prompt or "")

    def render(self, lm: LanguageModel) -> list[int]:
        """The prompt in ``lm``'s tokens, as the gateway renders it (a chat through the
        chat template, a completion as plain text)."""
        chat = self.chat()
        if chat is not None:
            return render_chat(lm.tokenizer, chat)
        return render_completion(lm.tokenizer, self.prompt or "")

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt} if self.prompt is not None else {}
        if self.messages is not None:
            row["messages"] = self.chat()
        if self.reference is not None:
            row["reference"] = self.reference
        return row


def read_prompts(
    path: Path,
    prompt_column: str = "prompt",
    messages_column: str = "messages",
    reference_column: str | None = None,
) -> list[TaskPrompt]:
    """Every row of ``path``, in file order; ``reference_column`` given: each row needs it."""
    path = Path(path)
    rows = read_file(path, f"a {prompt_column!r} or {messages_column!r}")
    prompts = []
    for number, row in enumerate(rows, start=1):
        where = f"{path}: row {number}"
        prompt, messages = row.get(prompt_column), row.get(messages_column)
        if (prompt in (None, "")) == (messages in (None, "", [])):
            raise TableError(
                f"{where} needs exactly one of {prompt_column!r} (a completion prompt) and "
                f"{messages_column!r} (a chat)"
            )
        reference: str | None = None
        if reference_column is not None:
            value = row.get(reference_column)
            if not isinstance(value, str) or not value.strip():
                raise TableError(f"{where} has no text in column {reference_column!r}")
            reference = value
        if prompt not in (None, ""):
            if not isinstance(prompt, str) or not prompt.strip():
                raise TableError(f"{where}: {prompt_column!r} must be text")
            prompts.append(TaskPrompt(prompt=prompt, reference=reference))
        else:
            chat = _messages(messages, f"{where}: {messages_column!r}")
            prompts.append(TaskPrompt(messages=chat, reference=reference))
    return prompts


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TableError(f"{where} is text, not a JSON list of messages") from None
    if not isinstance(value, list) or not value:
        raise TableError(f"{where} must be a non-empty list of {{role, content}} messages")
    chat = []
    for message in value:
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise TableError(f"{where}: each message is {{role, content}}, got {message!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES or not isinstance(content, str):
            raise TableError(
                f"{where}: a message's role is one of {', '.join(ROLES)} and its content "
                f"is text, got {message!r}"
            )
        chat.append((role, content))
    if chat[-1][0] == "assistant":
        raise TableError(f"{where}: the last message is the assistant's; end with the user's")
    return tuple(chat)
