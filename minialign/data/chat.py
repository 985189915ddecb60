"""HH dialogues in a chat model's own format.

Instruction-tuned models (SmolLM2-Instruct, Llama-Instruct, ...) answer far better inside the chat template
they were trained with than after a bare "\\n\\nHuman:" prompt. ``to_chat_format`` rewrites each pair's prompt
turns with ``tokenizer.apply_chat_template`` (ending with the assistant's generation prompt) and strips the
responses; the tokenizer's EOS (the template's end-of-turn token) is appended to each response at
tokenization, as for plain text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from minialign.base.errors import UserError
from minialign.data.sources import PreferenceData, PreferencePair

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"`` -> user/assistant messages (a, b, c)."""
    parts = _TURN.split(prompt)
    messages = [{"role": _ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the open "Assistant:" the model answers
    return messages


def _require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat_template is on, but this tokenizer has no chat template; turn it off for base models.")


def chat_prompt(text: str, tokenizer) -> str:
    """One prompt as a model trained with ``--chat-template`` saw its prompts: an HH dialogue's turns, or else the
    whole text as one user message, in the tokenizer's chat template, ending with the assistant's generation prompt."""
    _require_template(tokenizer)
    messages = hh_messages(text) if _TURN.search(text) else [{"role": "user", "content": text.strip()}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def to_chat_format(pairs: Sequence[PreferencePair], tokenizer) -> PreferenceData:
    _require_template(tokenizer)
    out = []
    for p in pairs:
        prompt = tokenizer.apply_chat_template(hh_messages(p.prompt), tokenize=False, add_generation_prompt=True)
        out.append(PreferencePair(prompt, p.chosen.strip(), p.rejected.strip(), p.margin))
    return PreferenceData(out, source=getattr(pairs, "source", ""), rows=getattr(pairs, "rows", len(out)),
                          skipped=dict(getattr(pairs, "skipped", {})))
