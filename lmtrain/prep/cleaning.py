"""Clean a document stream: Unicode and whitespace normalization, length filters, exact and near dedup.

The per-document work (`clean_document`: normalize, hash, MinHash signature) is pure and runs in
worker processes; the decisions that need the whole corpus so far (`Deduplicator`) run in one
process, in corpus order, so the result never depends on the number of workers.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter

import numpy as np
import xxhash

_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newline
_MANY_NEWLINES = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class CleaningOptions:
    """What the cleaning stage does; everything off gives the raw documents back."""

    unicode_form: str = "NFC"  # 'NFC', 'NFKC' or '' (no Unicode normalization)
    normalize_whitespace: bool = True  # one space between words, at most one blank line, stripped ends
    min_chars: int = 1  # drop documents shorter than this after normalization (empty ones always go)
    exact_dedup: bool = True  # drop documents whose normalized text was seen before
    near_dedup: bool = True  # drop documents whose MinHash Jaccard estimate to a kept one is >= threshold
    near_dup_threshold: float = 0.8
    num_perm: int = 128  # MinHash permutations
    shingle_words: int = 5  # words per shingle

    def enabled(self) -> bool:
        return bool(self.unicode_form or self.normalize_whitespace or self.min_chars > 1 or self.exact_dedup
                    or self.near_dedup)


def normalize_text(text: str, unicode_form: str = "NFC", whitespace: bool = True) -> str:
    """Unicode-normalize, drop control characters, and collapse runs of spaces and blank lines."""
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    if whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = _CONTROL.sub("", text)
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _MANY_NEWLINES.sub("\n\n", text).strip()
    return text


def split_long_document(text: str, max_chars: int) -> list[str]:
    """Cut a document longer than max_chars into pieces of at most max_chars, at whitespace where
    there is some in the second half of the window (else mid-word).

    Cleaning and tokenizing hold tens of bytes per character of a document at once, so one huge
    document (a whole corpus on a single line) would need tens of GB; its pieces need a bounded
    amount each. 0 keeps documents whole.
    """
    if not max_chars or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        window = text[start + max_chars // 2 : start + max_chars]
        cut = max(window.rfind(" "), window.rfind("\n"))
        end = start + max_chars // 2 + cut if cut > 0 else start + max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces


def text_hash(text: str) -> bytes:
    """A 128-bit content hash, stable across processes and runs (unlike Python's hash())."""
    return xxhash.xxh3_128_digest(text.encode("utf-8"))


def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0x5EED)  # fixed: signatures must agree across runs
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


_MINHASH_CHUNK = 4096  # shingles hashed at once: 4 MiB of uint64 at 128 permutations
_PERM_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def minhash_signature(text: str, num_perm: int = 128, shingle_words: int = 5) -> np.ndarray:
    """MinHash of the document's word shingles: uint32[num_perm].

    Each permutation is multiply-shift hashing, ((a * x + b) mod 2**64) >> 32, of a 32-bit shingle
    hash; the minimum over shingles of each permutation estimates Jaccard similarity.
    """
    if num_perm not in _PERM_CACHE:
        _PERM_CACHE[num_perm] = _permutations(num_perm)
    a, b = _PERM_CACHE[num_perm]
    words = _WORD.findall(text.lower())
    n = max(1, len(words) - shingle_words + 1)
    shingles = {" ".join(words[i : i + shingle_words]) for i in range(n)}
    x = np.fromiter((xxhash.xxh32_intdigest(s.encode("utf-8")) for s in shingles), np.uint64, len(shingles))
    del words, shingles
    signature = np.full(num_perm, np.iinfo(np.uint64).max, np.uint64)
    # In chunks: the [shingles, num_perm] uint64 product of a long document is 1 KiB per shingle
    # (about 170 bytes per character of text); a chunk bounds it, and the minimum is the same.
    for start in range(0, len(x), _MINHASH_CHUNK):
        with np.errstate(over="ignore"):
            hashed = (x[start : start + _MINHASH_CHUNK, None] * a[None, :] + b[None, :]) >> np.uint64(32)
        np.minimum(signature, hashed.min(axis=0), out=signature)
    return signature.astype(np.uint32)


def lsh_bands(num_perm: int, threshold: float) -> tuple[int, int]:
    """Pick (bands, rows) with bands * rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    best = None
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        midpoint = (1.0 / bands) ** (1.0 / rows)
        if best is None or abs(midpoint - threshold) < best[0]:
            best = (abs(midpoint - threshold), bands, rows)
    return best[1], best[2]


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """The LSH band keys of a signature: documents sharing one are candidate near duplicates."""
    return [signature[i * rows : (i + 1) * rows].tobytes() for i in range(bands)]


def near_duplicate(a: np.ndarray, b: np.ndarray, threshold: float) -> bool:
    """Whether two MinHash signatures estimate a Jaccard similarity of at least `threshold`."""
    return bool(np.mean(a == b) >= threshold)


def dropped_near_duplicates(edges) -> set:
    """The near-duplicate rule of `Deduplicator`, decided from the whole corpus at once: the documents
    (any ordered keys, e.g. corpus positions) that a near duplicate drops.

    `edges` are the pairs (earlier, later) of candidate documents (sharing a band key) that are near
    duplicates. Walking the documents in corpus order, one is dropped when it is a near duplicate of
    an earlier document that was kept, exactly as the corpus-order Deduplicator decides; a document
    with no edge is always kept, so only the documents with an edge need to be held here.
    """
    earlier: dict = {}
    for a, b in edges:
        earlier.setdefault(b, set()).add(a)
    dropped: set = set()
    for doc in sorted(earlier):
        if any(a not in dropped for a in earlier[doc]):
            dropped.add(doc)
    return dropped


@dataclasses.dataclass
class CleanedDocument:
    text: str | None  # None when a filter dropped it
    reason: str = ""  # which filter dropped it
    digest: bytes = b""
    signature: np.ndarray | None = None


def clean_document(text: str, opts: CleaningOptions) -> CleanedDocument:
    """The per-document part of cleaning (safe to run in a worker process)."""
    text = normalize_text(text, opts.unicode_form, opts.normalize_whitespace)
    if not text.strip():
        return CleanedDocument(None, "empty")
    if len(text) < opts.min_chars:
        return CleanedDocument(None, "too_short")
    digest = text_hash(text) if opts.exact_dedup else b""
    signature = minhash_signature(text, opts.num_perm, opts.shingle_words) if opts.near_dedup else None
    return CleanedDocument(text, "", digest, signature)


def clean_or_keep(text: str, opts: CleaningOptions) -> CleanedDocument:
    """`clean_document`, or the document as it is when every cleaning rule is off (--no-clean)."""
    return clean_document(text, opts) if opts.enabled() else CleanedDocument(text)


def clean_batch(texts: list[str], opts: CleaningOptions) -> list[CleanedDocument]:
    """`clean_document` over a batch: the unit of work sent to a worker process."""
    return [clean_document(text, opts) for text in texts]


class Deduplicator:
    """Corpus-order exact and near-duplicate decisions; the first occurrence is kept.

    Near duplicates: a document whose LSH bands collide with a kept document is compared on the
    full signatures, and dropped when the estimated Jaccard similarity reaches the threshold.
    Memory grows with the kept documents (16 bytes each for exact dedup, 4 * num_perm bytes plus
    the band keys for near dedup), which suits corpora up to tens of millions of documents.
    """

    def __init__(self, opts: CleaningOptions):
        self.opts = opts
        self._seen: set[bytes] = set()
        self._bands, self._rows = lsh_bands(opts.num_perm, opts.near_dup_threshold)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self._bands)]
        self._signatures: list[np.ndarray] = []

    def is_duplicate(self, doc: CleanedDocument) -> str:
        """Return 'exact_dup' or 'near_dup' if the document repeats a kept one, else '' (and remember it)."""
        if self.opts.exact_dedup:
            if doc.digest in self._seen:
                return "exact_dup"
        if self.opts.near_dedup:
            keys = band_keys(doc.signature, self._bands, self._rows)
            candidates = {c for band, key in zip(self._buckets, keys, strict=True) for c in band.get(key, ())}
            for c in candidates:
                if near_duplicate(self._signatures[c], doc.signature, self.opts.near_dup_threshold):
                    return "near_dup"
            index = len(self._signatures)
            self._signatures.append(doc.signature)
            for band, key in zip(self._buckets, keys, strict=True):
                band.setdefault(key, []).append(index)
        if self.opts.exact_dedup:
            self._seen.add(doc.digest)
        return ""


class CleaningReport(Counter):
    """Documents read, kept, and removed by each rule."""

    RULES = ("empty", "too_short", "exact_dup", "near_dup")

    def summary(self) -> dict[str, int]:
        return {"read": self["read"], "kept": self["kept"], **{f"removed_{r}": self[r] for r in self.RULES}}
