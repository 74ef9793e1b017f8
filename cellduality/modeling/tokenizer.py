"""A word-level tokenizer that keeps gene symbols whole, for tiny offline models.

Why word level: a cell sentence is a list of gene symbols, and a BPE vocabulary would cut
``RP11-34P13.7`` into pieces the tiny model has to learn to glue back together. Here every gene symbol
and every prompt word is one token, so a 64-wide model can learn the task in seconds on a CPU.

How text is cut (one regular expression, :data:`PIECE_PATTERN`, run by a serialisable ``Split``
pre-tokenizer so the behaviour survives ``save_pretrained`` / ``from_pretrained``):

* the completion tags ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` are always pieces of their
  own, even when glued to a word (``<answer>KLF1``);
* a word is a run of characters that are neither whitespace nor punctuation, with dots allowed
  *inside* (``RP11-34P13.7``, ``3.5``) but not at the end (``HBB.`` -> ``HBB`` + ``.``); ``-``, ``/``
  and ``_`` are word characters, because gene symbols use them;
* punctuation (``,;:!?()[]{}"'`.<>+``) is one piece per character, so ``KLF1,`` and ``type:`` give the
  known word plus the mark, and a combination ``FOXL2+HOXB9`` (or ``CD14+``) is made of known genes
  and ``+``: a perturbation name never seen in training still tokenizes without ``<unk>``;
* a word or mark keeps the single space in front of it (``" KLF1"``), like GPT-2's ``Ġ`` tokens; every
  other whitespace character is a piece of its own.

Because the space lives inside the tokens, decoding is plain concatenation (the ``Fuse`` decoder) and
``decode(encode(text)) == text`` for every text whose words are in the vocabulary. A decoder that
joined words with spaces would turn ``CD4-positive, alpha-beta T cell`` into
``CD4-positive , alpha-beta T cell``, which no longer matches the candidate label.

The tags are ordinary vocabulary words, not special tokens: TRL decodes completions with
``skip_special_tokens=True`` and the format reward must still see them. Only padding, begin/end of
sequence, ``<unk>`` and the chat role markers are special.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only; keeps ``import cellduality.modeling`` light
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
#: Special tokens, in id order: ``<pad>`` is 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then the roles.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values())
#: Completion-format tags (see ``cellduality.parsing``): plain words, never skipped on decode.
TAG_TOKENS: tuple[str, ...] = ("<think>", "</think>", "<answer>", "</answer>")
PUNCTUATION = ",;:!?()[]{}\"'`.<>+"
#: Whitespace pieces every vocabulary holds (a run of spaces is one piece per space).
WHITESPACE_TOKENS: tuple[str, ...] = (" ", "\n", "\t", "\r")

_P = re.escape(PUNCTUATION)
_TAG = r"</?(?:think|answer)>"
#: The pre-tokenizer's pattern (Oniguruma syntax, also valid for Python's ``re``); alternatives are
#: tried in order: tag, a space right before a tag, word, punctuation mark, single whitespace character.
PIECE_PATTERN = rf"{_TAG}|\s(?={_TAG})| ?[^\s{_P}]+(?:\.+[^\s{_P}]+)*| ?[{_P}]|\s"
_PIECE_RE = re.compile(PIECE_PATTERN)

#: Chat template (Jinja). Every turn is ``<|role|>\n`` + content + ``</s>`` + ``\n``; the assistant's
#: content and its ``</s>`` are wrapped in ``{% generation %}`` so TRL's ``assistant_only_loss`` and
#: ``return_assistant_tokens_mask`` work. ``</s>`` closes each turn, so generation stops at the end of
#: the answer. Unknown roles raise, because they would otherwise tokenise to ``<unk>`` silently.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown chat role: ' + message['role'] + ' (expected system, user or assistant)') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + eos_token -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def split_pieces(text: str) -> list[str]:
    """Cut ``text`` into the pieces the tokenizer looks up (same pattern as the saved pre-tokenizer)."""
    return _PIECE_RE.findall(text)


def _bare(piece: str) -> str:
    """A piece without its leading space (whitespace pieces stay as they are)."""
    return piece[1:] if len(piece) > 1 and piece[0] == " " else piece


def _texts_of(item: Any) -> Iterable[str]:
    """Strings inside ``item``: a string, a chat message, or a (nested) list of them."""
    if item is None:
        return
    if isinstance(item, str):
        yield item
    elif isinstance(item, Mapping):
        content = item.get("content")
        if content is not None:
            yield from _texts_of(content)
    elif isinstance(item, Iterable):
        for sub in item:
            yield from _texts_of(sub)
    else:
        yield str(item)


def words_from(texts: Iterable[Any]) -> set[str]:
    """The bare words and marks (no leading space) that ``texts`` contain.

    ``texts`` may hold strings, chat messages (``{"role", "content"}``) or lists of either, so a column
    of prompts can be passed as it is.
    """
    words: set[str] = set()
    for text in _texts_of(texts):
        for piece in split_pieces(text):
            if not piece.isspace():
                words.add(_bare(piece))
    return words


def vocabulary_from(genes: Iterable[str], texts: Iterable[Any] = ()) -> list[str]:
    """The token list, in id order: special tokens, tags, whitespace, then every word twice.

    Each gene symbol, punctuation mark and word harvested from ``texts`` appears bare (``KLF1``, for
    the start of a line or after a tag) and with its leading space (``" KLF1"``). The order is sorted,
    so the same inputs always give the same ids. A gene symbol that the pattern would split (it contains
    whitespace or punctuation other than ``-``/``.``/``/``/``_``) is logged: its pieces still enter the
    vocabulary, but it will not be one token.
    """
    bare: set[str] = set(PUNCTUATION)
    split_genes: list[str] = []
    for gene in genes:
        symbol = str(gene).strip()
        if not symbol:
            continue
        pieces = split_pieces(symbol)
        if pieces != [symbol]:
            split_genes.append(symbol)
            bare.update(_bare(p) for p in pieces if not p.isspace())
        else:
            bare.add(symbol)
    if split_genes:
        logger.warning(
            "%d gene symbol(s) are not kept whole by the tokenizer (they contain whitespace or punctuation), "
            "e.g. %s",
            len(split_genes),
            split_genes[:5],
        )
    bare.update(words_from(texts))
    reserved = set(SPECIAL_TOKENS) | set(TAG_TOKENS) | set(WHITESPACE_TOKENS)
    words = sorted(bare - reserved)
    spaced = sorted(f" {w}" for w in words)
    return [*SPECIAL_TOKENS, *TAG_TOKENS, *WHITESPACE_TOKENS, *words, *spaced]


def build_tokenizer(
    genes: Iterable[str],
    texts: Iterable[Any] = (),
    *,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary_from` ``(genes, texts)``, chat template included.

    Padding is on the left: the dual reward batches prompts through ``generate``, which needs the
    prompts right-aligned; TRL's trainers pad with their own collators and are not affected.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = vocabulary_from(genes, texts)
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
