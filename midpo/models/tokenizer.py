"""The tiny world's word-level tokenizer, and the one place where pad token and padding side are set.

The world is lower-case words with punctuation as separate words, so a WordLevel model over
whitespace-split text round-trips exactly: ``decode(encode(t)) == t`` for single-space separated ``t``
(tests/test_template.py asserts it on the corpus). Special tokens (``<pad> <unk> <bos> <eos> <user>
<assistant>``, ids 0-5) are reserved up front and must never occur in the training text: if they did,
the WordLevel trainer would give them a second id and training would index out of range.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from midpo.models.template import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    TEMPLATE_KEY,
    UNK,
    USER,
    WORLD_CHAT_TEMPLATE,
    WORLD_SPECIALS,
)

log = logging.getLogger(__name__)


def train_world_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over every whitespace-separated word of ``texts`` (min frequency 1).

    Word ids are ordered by frequency (ties by the trainer's deterministic order), after the specials.
    The result is a ``PreTrainedTokenizerFast`` that carries the world template (``midpo_template`` and the
    Jinja ``chat_template``) and adds no special tokens on its own: BOS/EOS come from the template text.
    """
    texts = list(texts)
    for text in texts:
        for special in WORLD_SPECIALS:
            if special in text:
                raise ValueError(f"tokenizer training text contains the special token {special!r}: {text[:80]!r}")
    backend = Tokenizer(models.WordLevel(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(WORLD_SPECIALS), min_frequency=1, vocab_size=1 << 20, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        clean_up_tokenization_spaces=False,  # the default would glue " ." to the previous word and break round-trips
        model_max_length=1 << 16,
        **{TEMPLATE_KEY: "world"},
    )
    tokenizer.chat_template = WORLD_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(list(WORLD_SPECIALS))
    assert ids == list(range(len(WORLD_SPECIALS))), f"special token ids {ids} are not 0..{len(WORLD_SPECIALS) - 1}"
    log.info("world tokenizer: %d words + %d special tokens", len(tokenizer) - len(WORLD_SPECIALS), len(WORLD_SPECIALS))
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set the pad token and padding side in one place; returns the same tokenizer.

    - Pad token: kept if set. Otherwise EOS is reused (chat models such as SmolLM2 ship without a pad;
      pads are masked out, so sharing EOS's id is harmless). A tokenizer with neither gets a new ``<pad>``
      special token, never a real word; the caller must then resize the embeddings (``load_model`` does).
    - Padding side: **left**, for generation (and batched scoring of prompts): every row's last prompt
      token sits at the same position, where the next token is generated. TRL's collators do not read
      this setting: they always pad **right** (``padding_side="right"`` passed explicitly in TRL 1.16's
      SFT and preference collators), which is right for teacher-forced training.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            log.info("tokenizer has no pad token: reusing EOS %r", tokenizer.eos_token)
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
            log.warning("tokenizer has neither pad nor EOS: added %r (resize the model's embeddings)", PAD)
    tokenizer.padding_side = "left"
    return tokenizer
