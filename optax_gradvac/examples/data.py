"""Multilingual word lists from ``wordfreq``: one language-modelling task per language.

Each language contributes a pool of its most frequent words (cleaned to the letters of
its alphabet). A held-out set of words, drawn uniformly from the pool, is never used
for training: the held-out score is the bits per character of unseen word types. Training
words are the rest of the pool, or, for the low-resource languages, only a few hundred of
them, drawn by frequency as a small corpus would hold them. The words of every training
batch are drawn by frequency too. "By frequency" means with probability proportional to
``frequency ** frequency_power`` (0.5 by default): plain frequency would spend most of the
training signal on a few dozen function words. An optional validation set, drawn uniformly
from the words left, serves to choose hyper-parameters without looking at the held-out words.

A word is encoded as ``[<lang>, c_1, ..., c_n, <eow>, <pad>, ...]``: a language-tag token,
its characters from one vocabulary shared by all languages, and an end-of-word token.
Everything is deterministic given ``seed``, and a language's words do not depend on which
other languages are loaded.
"""

from __future__ import annotations

import dataclasses
import unicodedata
import zlib
from collections.abc import Sequence

import numpy as np
import wordfreq

PAD = "<pad>"
END_OF_WORD = "<eow>"

_LATIN = "abcdefghijklmnopqrstuvwxyz"


@dataclasses.dataclass(frozen=True)
class Language:
  """A language: its name, its family and the letters its words may use."""

  name: str
  family: str
  letters: str


LANGUAGES: dict[str, Language] = {
  "es": Language("Spanish", "Romance", _LATIN + "áéíóúüñ"),
  "pt": Language("Portuguese", "Romance", _LATIN + "áâãàçéêíóôõú"),
  "it": Language("Italian", "Romance", _LATIN + "àèéìíîòóùú"),
  "fr": Language("French", "Romance", _LATIN + "àâæçéèêëîïôœùûüÿ"),
  "ca": Language("Catalan", "Romance", _LATIN + "àçèéíïòóúü"),
  "ro": Language("Romanian", "Romance", _LATIN + "ăâîșțşţ"),
  "de": Language("German", "Germanic", _LATIN + "äöüß"),
  "nl": Language("Dutch", "Germanic", _LATIN + "áéèëïóöü"),
  "sv": Language("Swedish", "Germanic", _LATIN + "åäöé"),
  "da": Language("Danish", "Germanic", _LATIN + "æøåé"),
  "nb": Language("Norwegian Bokmål", "Germanic", _LATIN + "æøåé"),
  "en": Language("English", "Germanic", _LATIN),
  "ru": Language("Russian", "Slavic-Cyrillic", "абвгдежзийклмнопрстуфхцчшщъыьэюяё"),
  "uk": Language("Ukrainian", "Slavic-Cyrillic", "абвгґдеєжзиіїйклмнопрстуфхцчшщьюя"),
  "bg": Language("Bulgarian", "Slavic-Cyrillic", "абвгдежзийклмнопрстуфхцчшщъьюя"),
  "mk": Language("Macedonian", "Slavic-Cyrillic", "абвгдѓежзѕијклљмнњопрстќуфхцчџш"),
  "pl": Language("Polish", "Slavic-Latin", _LATIN + "ąćęłńóśźż"),
  "cs": Language("Czech", "Slavic-Latin", _LATIN + "áčďéěíňóřšťúůýž"),
  "sk": Language("Slovak", "Slavic-Latin", _LATIN + "áäčďéíĺľňóôŕšťúýž"),
  "sl": Language("Slovenian", "Slavic-Latin", _LATIN + "čšž"),
}

DEFAULT_LANGUAGES: tuple[str, ...] = (
  *("es", "pt", "it", "fr"),
  *("de", "nl", "sv", "da"),
  *("ru", "uk", "bg", "mk"),
  *("pl", "cs", "sk", "sl"),
)
DEFAULT_LOW_RESOURCE: tuple[str, ...] = ("pt", "da", "uk", "sk")


def check_languages(codes: Sequence[str]) -> tuple[str, ...]:
  """Returns ``codes`` as a tuple after checking that each is a known, unrepeated language.

  Args:
    codes: language codes, e.g. ``("es", "pt")``.

  Returns:
    The codes, in the given order.

  Raises:
    ValueError: for an unknown or repeated code; the message lists the valid codes.
  """
  unknown = [code for code in codes if code not in LANGUAGES]
  if unknown:
    raise ValueError(
      f"unknown language code(s) {', '.join(unknown)}; valid codes: {', '.join(LANGUAGES)}"
    )
  if len(set(codes)) != len(codes):
    raise ValueError(f"repeated language code in {', '.join(codes)}")
  return tuple(codes)


def clean_words(words: Sequence[str], letters: str, min_len: int, max_len: int) -> list[str]:
  """Keeps the words made only of ``letters`` with a length in ``[min_len, max_len]``.

  Words are lowercased and NFC-normalised first, so that an accented letter is one
  character whatever form the source used. The order is kept and duplicates dropped.

  Args:
    words: raw words.
    letters: the characters a word may contain.
    min_len: the shortest length kept.
    max_len: the longest length kept.

  Returns:
    The cleaned words.
  """
  allowed = set(letters)
  seen = set()
  cleaned = []
  for word in words:
    word = unicodedata.normalize("NFC", word.lower())
    if min_len <= len(word) <= max_len and set(word) <= allowed and word not in seen:
      seen.add(word)
      cleaned.append(word)
  return cleaned


def load_word_pool(
  language: str, pool_size: int, min_len: int, max_len: int
) -> tuple[list[str], np.ndarray]:
  """Loads the cleaned ``pool_size`` most frequent words of a language and their frequencies.

  Args:
    language: a code in :data:`LANGUAGES`.
    pool_size: how many of the most frequent words to read before cleaning.
    min_len: the shortest word length kept.
    max_len: the longest word length kept.

  Returns:
    The words, most frequent first, and their frequencies (float64, same order).
  """
  spec = LANGUAGES[check_languages([language])[0]]
  words = clean_words(wordfreq.top_n_list(language, pool_size), spec.letters, min_len, max_len)
  # One dictionary read is ~50x faster than a `wordfreq.word_frequency` call per word, and
  # gives the same number for the single-token words of `top_n_list`.
  frequencies = wordfreq.get_frequency_dict(language)
  return words, np.array([frequencies[word] for word in words], dtype=np.float64)


def weighted_sample_without_replacement(
  weights: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
  """Draws ``count`` distinct indices, each draw proportional to ``weights`` among those left.

  Uses the Gumbel top-k trick, which is equivalent to drawing one index at a time.

  Args:
    weights: positive weights, shape ``[n]``.
    count: how many indices to draw, at most ``n``.
    rng: the random generator.

  Returns:
    The drawn indices, shape ``[count]``, int64.
  """
  keys = np.log(weights) + rng.gumbel(size=weights.shape)
  return np.argsort(-keys, kind="stable")[:count]


@dataclasses.dataclass(frozen=True, eq=False)
class MultilingualData:
  """Encoded training and held-out words for a set of languages.

  Attributes:
    languages: the language codes; the task axis follows this order.
    low_resource: the languages whose training words were cut to a few hundred.
    symbols: the shared vocabulary, ``symbols[token_id]``: padding, end of word, one
      language tag per language, then the letters of all the languages.
    train_words: per language, its training words.
    heldout_words: per language, its held-out words (disjoint from its training words).
    validation_words: per language, its validation words (disjoint from the training and the
      held-out words; empty without a validation split).
    train_tokens: int32 ``[T, max_train_words, seq_len]``, encoded training words, zero rows
      past each language's own count.
    train_probs: float32 ``[T, max_train_words]``, the probability of drawing each training
      word in a batch (zero on padding rows).
    heldout_tokens: int32 ``[T, max_heldout_words, seq_len]``, encoded held-out words, zero
      (all padding) rows past each language's own count.
    validation_tokens: int32 ``[T, validation_words, seq_len]``, encoded validation words, or
      ``None`` without a validation split.
  """

  languages: tuple[str, ...]
  low_resource: tuple[str, ...]
  symbols: tuple[str, ...]
  train_words: tuple[tuple[str, ...], ...]
  heldout_words: tuple[tuple[str, ...], ...]
  train_tokens: np.ndarray
  train_probs: np.ndarray
  heldout_tokens: np.ndarray
  validation_words: tuple[tuple[str, ...], ...] = ()
  validation_tokens: np.ndarray | None = None

  @property
  def num_tasks(self) -> int:
    """The number of languages, one task each."""
    return len(self.languages)

  @property
  def families(self) -> tuple[str, ...]:
    """The family of each language, in task order."""
    return tuple(LANGUAGES[code].family for code in self.languages)

  @property
  def seq_len(self) -> int:
    """The length of an encoded word: tag, up to ``max_len`` letters, end of word."""
    return self.train_tokens.shape[-1]


def build_symbols(languages: Sequence[str]) -> tuple[str, ...]:
  """Returns the shared vocabulary: padding, end of word, language tags, then letters.

  Args:
    languages: the language codes.

  Returns:
    The symbols; a symbol's index is its token id, and padding is token 0.
  """
  letters = sorted(set().union(*(LANGUAGES[code].letters for code in languages)))
  return (PAD, END_OF_WORD, *(f"<{code}>" for code in languages), *letters)


def encode_words(
  words: Sequence[str], language: str, symbols: Sequence[str], seq_len: int
) -> np.ndarray:
  """Encodes words as ``[<lang>, letters..., <eow>]`` padded with token 0 to ``seq_len``.

  Args:
    words: the words of one language.
    language: their language code (selects the tag token).
    symbols: the vocabulary from :func:`build_symbols`.
    seq_len: the encoded length; must be at least the longest word plus 2.

  Returns:
    int32 token ids, shape ``[len(words), seq_len]``.
  """
  index = {symbol: i for i, symbol in enumerate(symbols)}
  tokens = np.zeros((len(words), seq_len), dtype=np.int32)
  for row, word in enumerate(words):
    ids = [index[f"<{language}>"], *(index[letter] for letter in word), index[END_OF_WORD]]
    tokens[row, : len(ids)] = ids
  return tokens


def _stack_padded(arrays: Sequence[np.ndarray]) -> np.ndarray:
  """Stacks arrays along a new leading axis, zero-padding their first axis to the longest."""
  longest = max(len(array) for array in arrays)
  out = np.zeros((len(arrays), longest, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
  for i, array in enumerate(arrays):
    out[i, : len(array)] = array
  return out


def make_data(
  languages: Sequence[str] = DEFAULT_LANGUAGES,
  *,
  low_resource: Sequence[str] = DEFAULT_LOW_RESOURCE,
  low_resource_words: int = 500,
  heldout_words: int = 500,
  validation_words: int = 0,
  pool_size: int = 20_000,
  min_len: int = 2,
  max_len: int = 16,
  frequency_power: float = 0.5,
  seed: int = 0,
) -> MultilingualData:
  """Loads, splits and encodes the word lists of ``languages``.

  Args:
    languages: language codes, one task each, in task order.
    low_resource: languages (a subset of ``languages``) that keep only
      ``low_resource_words`` training words.
    low_resource_words: the number of training words of a low-resource language.
    heldout_words: the number of held-out words per language.
    validation_words: the number of validation words per language (0: no validation split),
      drawn uniformly from the words that are neither held-out nor training words of a
      low-resource language. The held-out words, and a low-resource language's training words
      and batches, do not depend on it; the other languages lose these words from training.
    pool_size: how many of each language's most frequent words to read.
    min_len: the shortest word kept.
    max_len: the longest word kept.
    frequency_power: words are drawn with probability proportional to
      ``frequency ** frequency_power``.
    seed: the random seed of the held-out and low-resource draws.

  Returns:
    The encoded data.

  Raises:
    ValueError: for unknown languages, low-resource languages that are not in
      ``languages``, or a pool too small for the requested split.
  """
  languages = check_languages(languages)
  low_resource = check_languages(low_resource)
  missing = [code for code in low_resource if code not in languages]
  if missing:
    raise ValueError(f"low-resource language(s) {', '.join(missing)} not in the languages")
  symbols = build_symbols(languages)
  seq_len = max_len + 2
  train_words, heldout, validation, train_tokens, train_probs = [], [], [], [], []
  heldout_tokens, validation_tokens = [], []
  for code in languages:
    words, frequencies = load_word_pool(code, pool_size, min_len, max_len)
    wanted = heldout_words + validation_words + (low_resource_words if code in low_resource else 1)
    if len(words) < wanted:
      raise ValueError(f"{code}: {len(words)} clean words in the pool, {wanted} needed")
    # Seeding per language keeps a language's split independent of the others loaded.
    rng = np.random.default_rng([seed, zlib.crc32(code.encode())])
    order = rng.permutation(len(words))
    held, rest = order[:heldout_words], np.sort(order[heldout_words:])
    weights = frequencies**frequency_power
    if code in low_resource:
      # A small corpus holds mostly frequent words: draw them by frequency, not uniformly.
      rest = np.sort(
        rest[weighted_sample_without_replacement(weights[rest], low_resource_words, rng)]
      )
    # The validation words are the next ones of the permutation that are not a low-resource
    # language's training words: the held-out words, and a low-resource language's training
    # words and batches, are then the same with or without a validation split.
    unused = order[heldout_words:]
    if code in low_resource:
      unused = unused[~np.isin(unused, rest)]
    validated = np.sort(unused[:validation_words])
    rest = np.setdiff1d(rest, validated)
    train_words.append(tuple(words[i] for i in rest))
    heldout.append(tuple(words[i] for i in np.sort(held)))
    validation.append(tuple(words[i] for i in validated))
    train_tokens.append(encode_words(train_words[-1], code, symbols, seq_len))
    heldout_tokens.append(encode_words(heldout[-1], code, symbols, seq_len))
    validation_tokens.append(encode_words(validation[-1], code, symbols, seq_len))
    train_probs.append((weights[rest] / weights[rest].sum()).astype(np.float32))
  return MultilingualData(
    languages=languages,
    low_resource=tuple(code for code in languages if code in low_resource),
    symbols=symbols,
    train_words=tuple(train_words),
    heldout_words=tuple(heldout),
    train_tokens=_stack_padded(train_tokens),
    train_probs=_stack_padded(train_probs),
    heldout_tokens=_stack_padded(heldout_tokens),
    validation_words=tuple(validation) if validation_words else (),
    validation_tokens=np.stack(validation_tokens) if validation_words else None,
  )


def sample_batches(data: MultilingualData, steps: int, batch_words: int, seed: int) -> np.ndarray:
  """Draws the training word indices of every step, by (tempered) frequency.

  Drawing them up front gives every method the same data order.

  Args:
    data: the encoded data.
    steps: the number of training steps.
    batch_words: the number of words per language per step.
    seed: the random seed of the draws.

  Returns:
    int32 indices into ``data.train_tokens[t]``, shape ``[steps, T, batch_words]``.
  """
  rng = np.random.default_rng(seed)
  indices = np.empty((steps, data.num_tasks, batch_words), dtype=np.int32)
  for task, probs in enumerate(data.train_probs):
    probs = probs.astype(np.float64)  # `choice` checks the sum to float64 precision
    indices[:, task] = rng.choice(len(probs), size=(steps, batch_words), p=probs / probs.sum())
  return indices
