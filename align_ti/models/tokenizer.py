"""A tiny, local, Qwen-style tokenizer for the random-weight test/demo models.

Why this shape:
- Nothing may be downloaded, so the tokenizer is built in code with the `tokenizers` library.
- Byte-level BPE (GPT-2/Qwen pre-tokenizer and decoder) over the 256 byte symbols means any
  text encodes and decodes exactly; there is no unknown token.
- The closed vocabulary of the synthetic VQA data (plus a few chat words) are whole-word
  entries found directly (`ignore_merges=True`), so the merge list can stay empty and every
  question/answer word is exactly one token: short sequences, easy for tiny models to learn.
- The special tokens sit at fixed ids 0..3, so the model configs can rely on them even if the
  word list grows. len(tokenizer) stays far below the LM-head rows (1271 student / 1300
  teacher); the rows above it are padding rows that are never produced by the tokenizer.
- A model family's own special tokens (Qwen-VL's ``<|vision_start|>``, InternVL's ``<img>``, ...)
  are appended after the words, in the order given (`build_tokenizer(extra_special_tokens=...)`),
  so teacher and student of one family share every id; each family's adapter names them
  (`align_ti.models.families`).
"""
from __future__ import annotations

import functools
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import AddedToken as RawAddedToken
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
#: Fixed ids (0..3) of the special tokens, in this order.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)

#: Whole-word vocabulary: chat roles, the synthetic VQA words and some general filler words.
#: Each word is added lower-case and capitalised, with and without a leading space.
WORDS = (
    # chat / prompt words
    "user assistant system you are a an helpful answer with one single word or phrase "
    "please question image picture photo describe this that it in on of to and the "
    # synthetic VQA: question words
    "what which where how many is there shape shapes colour color count number "
    # shapes (singular, plural), colours, positions, answers
    "circle circles square squares triangle triangles "
    "red green blue yellow purple orange white black gray grey "
    "top bottom left right center middle upper lower corner "
    "yes no none zero two three four five six seven eight nine ten"
).split()

def make_chat_template(image_markup: str = "<image>\n", system_prompt: str | None = None) -> str:
    """A Qwen-like (ChatML) chat template. Content may be a string or a list of
    {"type": "image"} / {"type": "text", "text": ...} items; an image renders as
    ``image_markup`` in place. With ``system_prompt``, a conversation that does not open with a
    system turn gets one (as the Qwen-VL templates do)."""
    system = ""
    if system_prompt is not None:
        system = ("{%- if loop.first and message['role'] != 'system' -%}"
                  "{{- '<|im_start|>system\\n" + system_prompt + "<|im_end|>\\n' -}}"
                  "{%- endif -%}")
    return (
        "{%- for message in messages -%}"
        + system +
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] -}}"
        "{%- else -%}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' or 'image' in item -%}"
        "{{- '" + image_markup.replace("\n", "\\n") + "' -}}"
        "{%- elif item['type'] == 'text' -%}"
        "{{- item['text'] -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{{- '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|im_start|>assistant\\n' -}}"
        "{%- endif -%}"
    )


#: The LLaVA-style template of the tiny models: an image renders as "<image>\n" in place.
CHAT_TEMPLATE = make_chat_template()


def _vocab() -> dict[str, int]:
    """Specials at 0..3, then the 256 byte symbols, then whole words (deterministic order)."""
    byte_map = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    to_symbols = lambda s: "".join(_BYTE_TO_UNICODE[b] for b in s.encode("utf-8"))  # noqa: E731
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for sym in sorted(byte_map):
        vocab[sym] = len(vocab)
    digits = [str(d) for d in range(10)]
    for word in list(WORDS) + digits:
        for form in dict.fromkeys((word, word.capitalize())):
            for text in (form, " " + form):
                sym = to_symbols(text)
                if sym not in vocab:
                    vocab[sym] = len(vocab)
    return vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_UNICODE = _bytes_to_unicode()


@functools.lru_cache(maxsize=8)
def _raw_tokenizer_json(extra_special_tokens: tuple[str, ...] = ()) -> str:
    vocab = _vocab()
    for token in extra_special_tokens:  # after the words: the shared ids above stay where they are
        if token in vocab:
            raise ValueError(f"extra_special_tokens: {token!r} is already in the vocabulary")
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL_TOKENS + tuple(extra_special_tokens)
    tok.add_special_tokens([RawAddedToken(t, special=True, normalized=False) for t in specials])
    return tok.to_str()


def build_tokenizer(extra_special_tokens: Sequence[str] = (), named_tokens: dict[str, str] | None = None,
                    chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Return a fresh Qwen-style tokenizer (a new object each call, so callers may mutate it).

    Special tokens: pad `<|endoftext|>` (id 0), `<|im_start|>` (1), eos `<|im_end|>` (2) and the
    image token `<image>` (3, also exposed as `tokenizer.image_token` / `image_token_id`).

    A model family adds its own: ``extra_special_tokens`` are appended after the vocabulary in
    this order (atomic, never split), ``named_tokens`` expose some of them as attributes the
    family's processor reads (``{"image_token": "<|image_pad|>"}`` gives
    ``tokenizer.image_token`` and ``tokenizer.image_token_id``; it replaces the default
    ``image_token``), and ``chat_template`` replaces the LLaVA-style template.
    """
    named = {"image_token": IMAGE_TOKEN, **(named_tokens or {})}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_raw_tokenizer_json(tuple(extra_special_tokens))),
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        chat_template=chat_template,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
        **named,
    )
    return tok
