"""One prompt template per model family, defined once and used by training, scoring and generation.

A template turns ``(prompt, context)`` into the text before the response and a response into the text
that ends it (the response plus EOS). Everything downstream works on those two strings:

- training (TRL SFT and DPO) gets plain-text ``prompt``/``completion`` (``chosen``/``rejected``) columns
  from :meth:`PromptTemplate.sft_example` / :meth:`PromptTemplate.preference_example`;
- scoring tokenizes them with :meth:`PromptTemplate.tokenize` exactly as TRL does;
- generation feeds :meth:`PromptTemplate.render_prompt` to the model (left padded) and cuts at EOS.

Tokenization convention (the one TRL 1.16 uses for plain-text data): rendered text is always tokenized
with the tokenizer's defaults, ``tokenizer(text)``. Templates therefore never leave a BOS in the text
that the tokenizer would add a second time.

Families:

``world``
    The tiny word-level model. Role markers are dedicated special tokens, so no world word can forge a
    turn boundary::

        <bos> <user> what is the capital of france ? <assistant>          (render_prompt)
         the capital of france is paris . <eos>                          (render_completion)

    Earlier turns are ``<user> ... <assistant> ... <eos>``. The same rendering is saved as the
    tokenizer's Jinja ``chat_template`` (:data:`WORLD_CHAT_TEMPLATE`), so code that calls
    ``apply_chat_template`` gets identical text.
``chat``
    A tokenizer's own chat template (SmolLM2's ChatML ...) via
    ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``; the completion is the
    response plus ``tokenizer.eos_token`` (TRL's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The tokenizer_config.json field that names the family of a tokenizer built by midpo.
TEMPLATE_KEY = "midpo_template"
FAMILIES = ("world", "chat")

# Special tokens of the world family (midpo.models.tokenizer trains the tokenizer around them).
BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
USER, ASSISTANT = "<user>", "<assistant>"
WORLD_SPECIALS = (PAD, UNK, BOS, EOS, USER, ASSISTANT)  # ids 0..5, in this order

# The world rendering as Jinja, for ``apply_chat_template`` callers (TRL conversational data, servers).
# It must stay identical to WorldTemplate; tests/test_template.py checks both on the same dialogues.
WORLD_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %} <assistant> {{ m['content'] }} {{ eos_token }}"
    "{% else %}{{ raise_exception('the world template has only user and assistant turns') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)

Message = dict[str, str]


class PromptTemplate:
    """How one model family sees a dialogue. Subclasses implement :meth:`render_prompt`."""

    family: str = ""

    def __init__(self, eos_token: str) -> None:
        if not eos_token:
            raise ValueError("a template needs an EOS token to terminate completions")
        self.eos_token = eos_token

    def render_prompt(self, prompt: str, context: Sequence[Message] = ()) -> str:
        """Everything before the response: earlier turns ``context`` ([{role, content}]), then ``prompt``."""
        raise NotImplementedError

    def render_completion(self, response: str) -> str:
        """The response as the model must produce it, terminated by EOS (TRL then adds no second EOS)."""
        return response + self.eos_token

    def render(self, prompt: str, response: str, context: Sequence[Message] = ()) -> str:
        """The whole training text: prompt and completion concatenated, as TRL concatenates them."""
        return self.render_prompt(prompt, context) + self.render_completion(response)

    # -- the three consumers ------------------------------------------------------------------------

    def sft_example(self, prompt: str, response: str, context: Sequence[Message] = ()) -> dict[str, str]:
        """A TRL prompt-completion row (plain text, not conversational)."""
        return {"prompt": self.render_prompt(prompt, context), "completion": self.render_completion(response)}

    def preference_example(self, prompt: str, chosen: str, rejected: str, context: Sequence[Message] = ()) -> dict[str, str]:
        """A TRL preference row (plain text, not conversational)."""
        return {
            "prompt": self.render_prompt(prompt, context),
            "chosen": self.render_completion(chosen),
            "rejected": self.render_completion(rejected),
        }

    def tokenize(self, tokenizer: Any, prompt: str, response: str, context: Sequence[Message] = ()) -> tuple[list[int], list[int]]:
        """``(prompt_ids, completion_ids)`` exactly as TRL 1.16 tokenizes a plain-text row, for scoring.

        TRL tokenizes the prompt alone and prompt + completion, and the completion starts where the two
        diverge (``common_prefix_length``); with the templates here they never diverge inside the prompt.
        """
        prompt_text = self.render_prompt(prompt, context)
        prompt_ids = tokenizer(prompt_text)["input_ids"]
        full_ids = tokenizer(prompt_text + self.render_completion(response))["input_ids"]
        n = 0
        while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
            n += 1
        return full_ids[:n], full_ids[n:]

    def completion_text(self, tokenizer: Any, generated_ids: Sequence[int]) -> str:
        """Decode generated ids (after the prompt) into the response: cut at the first EOS, drop pads/specials."""
        ids = list(generated_ids)
        eos_id = tokenizer.convert_tokens_to_ids(self.eos_token)
        if eos_id in ids:
            ids = ids[: ids.index(eos_id)]
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r}, eos_token={self.eos_token!r})"


class WorldTemplate(PromptTemplate):
    """The tiny word-level model's template: special-token role markers, words separated by single spaces."""

    family = "world"

    def __init__(self) -> None:
        super().__init__(EOS)

    def render_prompt(self, prompt: str, context: Sequence[Message] = ()) -> str:
        parts = [BOS]
        for turn in context:
            role, content = turn["role"], self._check(turn["content"])
            if role == "user":
                parts += [USER, content]
            elif role == "assistant":
                parts += [ASSISTANT, content, EOS]
            else:
                raise ValueError(f"the world template has only user and assistant turns, got role {role!r}")
        parts += [USER, self._check(prompt), ASSISTANT]
        return " ".join(parts)

    def render_completion(self, response: str) -> str:
        # The leading space keeps the text readable and round-trippable; word-level tokens never merge
        # across it, so the prompt's ids are a prefix of the prompt + completion ids. An empty response
        # (a model that emitted EOS at once) is just the EOS: it must still be scorable.
        return f" {self._check(response)} {EOS}" if response.strip() else f" {EOS}"

    @staticmethod
    def _check(text: str) -> str:
        """World text is single-space separated words; a special token inside it would forge structure."""
        text = " ".join(text.split())
        if not text:
            raise ValueError("empty turn text")
        for special in WORLD_SPECIALS:
            if special in text:
                raise ValueError(f"world text must not contain the special token {special!r}: {text[:80]!r}")
        return text


class ChatTemplate(PromptTemplate):
    """A tokenizer's own chat template (``apply_chat_template``), e.g. SmolLM2's ChatML."""

    family = "chat"

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{type(tokenizer).__name__} has no chat_template; pass a chat model's tokenizer or a world tokenizer")
        super().__init__(tokenizer.eos_token)
        self.tokenizer = tokenizer
        # If the tokenizer adds BOS itself (Llama style), a BOS rendered by the chat template would be doubled
        # by ``tokenizer(text)``: strip it from the text so the convention "tokenize with defaults" holds.
        bos = tokenizer.bos_token
        probe = tokenizer("a")["input_ids"]
        self._strip_bos = bos if bos and probe and probe[0] == tokenizer.bos_token_id else None

    def render_prompt(self, prompt: str, context: Sequence[Message] = ()) -> str:
        messages = [*({"role": m["role"], "content": m["content"]} for m in context), {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self._strip_bos and text.startswith(self._strip_bos):
            text = text[len(self._strip_bos) :]
        return text


def template_for(tokenizer: Any, family: str | None = None) -> PromptTemplate:
    """The template of ``tokenizer``'s family: ``family`` if given, else the ``midpo_template`` field saved
    in its tokenizer_config.json (set by midpo's tiny tokenizer), else ``chat`` (its own chat template)."""
    family = family or getattr(tokenizer, "init_kwargs", {}).get(TEMPLATE_KEY) or "chat"
    if family == "world":
        missing = [t for t in WORLD_SPECIALS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer lacks the world special tokens {missing}")
        return WorldTemplate()
    if family == "chat":
        return ChatTemplate(tokenizer)
    raise ValueError(f"unknown template family {family!r} (known: {', '.join(FAMILIES)})")
