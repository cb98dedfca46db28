"""Compact codecs for the exported page's card data; static/export_card.js holds the decoders.

- Canonical Huffman codes for token ids. Ids are ranked by frequency, so code lengths never
  decrease with the id and the decoder needs only the number of codes of each length (as in
  zlib's `puff`). Each card's token ids are one run of bits, decoded on demand.
- "base91x2": binary as printable ASCII, 13 bits per 2 characters (23% overhead, base64 has 33%).
  The 91 characters are printable ASCII other than ``<``, ``>`` and ``&``, so the text can sit in a
  <script> element, which no ``</script`` or ``<!--`` can then end early.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_BITS = 24
TEXT_ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "<>&")
GROUP_BITS = 13
_BASE = len(TEXT_ALPHABET)
assert _BASE == 91 and _BASE * _BASE >= 1 << GROUP_BITS


# --------------------------------------------------------------------------------------------
# Huffman


def huffman_code_lengths(counts: np.ndarray, max_bits: int = MAX_CODE_BITS) -> np.ndarray:
    """Code length of each symbol; ``counts`` must be non-increasing (symbols ranked by frequency).

    Lengths are capped at ``max_bits`` by raising the rarest counts (a little longer codes for
    common symbols, so the browser decodes with 32-bit integers).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and np.any(np.diff(counts) > 0):
        raise ValueError("huffman_code_lengths needs counts sorted from most to least frequent")
    if counts.size <= 1:
        return np.ones(counts.size, dtype=np.int64)
    weights = np.maximum(counts, 1)
    floor = 0
    while True:
        lengths = _huffman_lengths(np.maximum(weights, floor))
        if lengths.max() <= max_bits:
            # Same multiset of lengths, shortest to the most frequent: still optimal, and canonical.
            return np.sort(lengths)
        floor = max(2 * floor, int(weights.sum() >> (max_bits - 2)), 1)


def _huffman_lengths(weights: np.ndarray) -> np.ndarray:
    heap = [(int(w), i, (i,)) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    lengths = np.zeros(len(weights), dtype=np.int64)
    tiebreak = len(weights)
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        members = a + b
        lengths[list(members)] += 1
        heapq.heappush(heap, (w1 + w2, tiebreak, members))
        tiebreak += 1
    return lengths


def length_counts(lengths: np.ndarray) -> list[int]:
    """Number of codes of each length 0..max (what the decoder needs)."""
    return np.bincount(np.asarray(lengths, dtype=np.int64), minlength=2).tolist()


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol, given non-decreasing lengths (deflate's rule)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.bincount(lengths, minlength=MAX_CODE_BITS + 2)
    first = np.zeros_like(counts)
    code = 0
    for length in range(1, len(counts)):
        code = (code + counts[length - 1]) << 1 if length > 1 else 0
        first[length] = code
    start = np.searchsorted(lengths, lengths, side="left")  # first symbol of each length
    return first[lengths] + (np.arange(lengths.size) - start)


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bitstream (MSB first, zero-padded to bytes) of ``symbols``, and the bit length of each."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > MAX_CODE_BITS:
        raise ValueError(f"codes longer than {MAX_CODE_BITS} bits cannot be packed; cap them")
    symbols = np.asarray(symbols, dtype=np.int64)
    codes = canonical_codes(lengths).astype(np.uint64)[symbols]
    bits = lengths[symbols]
    starts = np.cumsum(bits) - bits
    n_bytes = -(-int(bits.sum()) // 8)
    # Each code (<= 24 bits) at its bit offset within a byte (<= 7) fits in a 32-bit window of
    # 4 bytes. Codes never share bits, so adding their bytes is the same as OR-ing them.
    window = codes << (32 - bits - (starts & 7)).astype(np.uint64)
    first_byte = starts >> 3
    runs = np.flatnonzero(np.diff(first_byte, prepend=-1))  # codes that start in the same byte
    run_byte = first_byte[runs]
    stream = np.zeros(n_bytes + 4, dtype=np.uint64)
    for k in range(4):
        part = (window >> np.uint64(24 - 8 * k)) & np.uint64(0xFF)
        stream[run_byte + k] += np.add.reduceat(part, runs) if runs.size else 0
    return stream[:n_bytes].astype(np.uint8), bits


# --------------------------------------------------------------------------------------------
# Text


def encode_text(data: bytes) -> str:
    """``data`` as base91x2 text (2 characters per 13 bits, little-endian bit order)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    raw = np.concatenate([raw, np.zeros(-raw.size % GROUP_BITS, dtype=np.uint8)])
    alphabet = np.frombuffer(TEXT_ALPHABET.encode("ascii"), dtype=np.uint8)
    weights = (1 << np.arange(GROUP_BITS)).astype(np.int32)
    pieces = []
    chunk = GROUP_BITS * 65536  # bytes per step: 8 groups of 13 bits per 13 bytes
    for begin in range(0, raw.size, chunk):
        bits = np.unpackbits(raw[begin : begin + chunk].reshape(-1, GROUP_BITS), axis=1, bitorder="little")
        values = bits.reshape(-1, GROUP_BITS).astype(np.int32) @ weights
        pair = np.stack([values % _BASE, values // _BASE], axis=1)
        pieces.append(alphabet[pair.ravel()].tobytes())
    groups = -(-len(data) * 8 // GROUP_BITS)  # groups that carry data; the rest is padding
    return b"".join(pieces)[: 2 * groups].decode("ascii")
