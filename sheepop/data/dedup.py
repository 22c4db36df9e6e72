"""Deduplicate: exact (content hash) and near (MinHash signatures + LSH from `datasketch`).

Signatures are computed per document, in parallel; the LSH index is then filled in document
order on the driver, so the first copy of a document is always the one kept and the result
does not depend on how many workers computed the signatures.

Shingles are word n-grams of the lower-cased text (`\\w+` runs), so whitespace, case and
punctuation edits do not hide a copy. Each word is hashed with a stable hash (crc32: Python's
`hash` changes per process) and n-grams are combined in numpy. The signature is exactly what
datasketch's `MinHash(num_perm, seed=SEED, hashfunc=int).update_batch(shingle_hashes)` holds
(its default "affine32" scheme: MurmurHash3 finalizer, then a·h + b mod 2^32 per permutation),
computed here on whole numpy arrays instead of a Python loop over shingles.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from functools import lru_cache

import numpy as np

# datasketch is imported where it is used: it imports scipy (~0.3 s), and every rank imports this
# module (through sheepop.data.shards) without deduplicating anything.

SEED = 1  # MinHash permutation seed: fixed, so signatures agree across workers and runs
_WORD = re.compile(r"\w+")
_MAX_HASH = np.uint64((1 << 32) - 1)
SCHEME = "affine32"
_CHUNK = 1 << 15  # shingles per numpy block: bounds memory at CHUNK × num_perm × 8 bytes


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@lru_cache(maxsize=None)
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (what datasketch applies before its permutations)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """Unique 32-bit hashes of the word n-grams of `text` (one n-gram for shorter texts)."""
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    cache: dict[str, int] = {}
    wh = np.fromiter((cache[w] if w in cache else cache.setdefault(w, zlib.crc32(w.encode())) for w in words),
                     dtype=np.uint64, count=len(words))
    k = min(shingle_size, len(words))
    n = len(words) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for i in range(k):  # polynomial combination of the k word hashes, wrapping in uint64
        h = h * np.uint64(1_000_003) ^ wh[i:i + n]
    return np.unique(h & _MAX_HASH)


def signature(text: str, shingle_size: int, num_perm: int) -> np.ndarray:
    """MinHash signature: num_perm uint32 values."""
    a, b = _permutations(num_perm)
    sig = np.full(num_perm, np.uint32(0xFFFFFFFF), dtype=np.uint32)
    hv = _fmix32(shingle_hashes(text, shingle_size).astype(np.uint32))
    for i in range(0, len(hv), _CHUNK):
        phv = np.multiply.outer(hv[i:i + _CHUNK], a) + b  # uint32: wraps, i.e. mod 2^32
        np.minimum(sig, phv.min(axis=0), out=sig)
    return sig


class NearDuplicates:
    """LSH index over signatures; `check` answers 'near-duplicate of an earlier document?'.

    A candidate from the LSH buckets counts only if its estimated Jaccard similarity really
    reaches the threshold, which removes most of LSH's false positives.
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[str, np.ndarray] = {}

    def check(self, key: str, sig: np.ndarray) -> str:
        """Key of the earlier document this one nearly duplicates ('' if none); indexes it if new."""
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=SEED, hashvalues=sig, scheme=SCHEME)
        best, best_j = "", 0.0
        for other in sorted(self.lsh.query(m)):  # sorted: the answer must not depend on set order
            j = float(np.mean(self.sigs[other] == sig))
            if j >= self.threshold and j > best_j:
                best, best_j = other, j
        if best:
            return best
        self.lsh.insert(key, m)
        self.sigs[key] = sig
        return ""
