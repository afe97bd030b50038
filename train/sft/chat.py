"""kiln's chat template: role spans delimited by the reserved control tokens.

    [<|system|>S<|end_of_turn|>] <|user|>U<|end_of_turn|><|assistant|>A<|end_of_turn|> ...

Training encodes a conversation span by span (the role token id, the content's ids, the
end-of-turn id), so the loss mask comes from which span a token belongs to, never from
searching the text. Because the tokenizer splits text at user-defined symbols (both
SentencePiece and the exported HF tokenizer do), span-wise ids equal the ids of the
rendered string; ``JINJA_TEMPLATE`` renders the same string for transformers'
``apply_chat_template`` and is saved with every instruction checkpoint, and generation
(``launch/generate.py --chat``) renders prompts with ``render_text``. Content that
contains a control token string is refused: it would inject a turn boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.checkpoint import CHAT_TEMPLATE

ROLES = ("system", "user", "assistant")
ROLE_TOKEN = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end_of_turn|>"
CONTROL_STRINGS = (*ROLE_TOKEN.values(), END_OF_TURN)
TEMPLATE_FILE = CHAT_TEMPLATE  # the file name is the checkpoint module's

JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('kiln chat template: unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end_of_turn|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The template as a string (what JINJA_TEMPLATE renders)."""
    out = "".join(f"{ROLE_TOKEN[m['role']]}{m['content']}{END_OF_TURN}" for m in messages)
    return out + (ROLE_TOKEN["assistant"] if add_generation_prompt else "")


@dataclass
class EncodedChat:
    ids: list[int]
    target: list[bool]  # per token: is it predicted with loss (it is then the target of the previous position)


def control_ids(tok) -> dict[str, int]:
    missing = [t for t in CONTROL_STRINGS if t not in tok.control]
    if missing:
        raise ValueError(f"tokenizer {tok.path} lacks the reserved chat tokens {missing}; kiln tokenizers reserve "
                         "them at training time (data_pipeline/tokenizer.py)")
    return {t: tok.control[t] for t in CONTROL_STRINGS}


def encode_chat(tok, messages: list[dict], mask: str = "assistant", add_generation_prompt: bool = False) -> EncodedChat:
    """Token ids of a conversation and which of them are loss targets under ``mask``.

    assistant: content and end-of-turn of every assistant turn; last_assistant: of the last
    one only; all_turns: content and end-of-turn of every turn (role tokens stay context);
    all: every token. The end-of-turn closing a trained turn is always a target, so the
    model learns to stop.
    """
    ctl = control_ids(tok)
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids: list[int] = []
    target: list[bool] = []
    for i, m in enumerate(messages):
        role = m["role"]
        trained = (mask in ("all", "all_turns") or (role == "assistant" and mask == "assistant")
                   or (role == "assistant" and mask == "last_assistant" and i == last_assistant))
        content = tok.encode(m["content"])
        ids += [ctl[ROLE_TOKEN[role]], *content, ctl[END_OF_TURN]]
        target += [mask == "all"] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(ctl[ROLE_TOKEN["assistant"]])
        target.append(False)
    return EncodedChat(ids, target)


def encode_prompt(tok, prompt: str, system: str | None = None) -> list[int]:
    """Ids that ask the model for an assistant reply to ``prompt`` (generation side)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return encode_chat(tok, messages, add_generation_prompt=True).ids
