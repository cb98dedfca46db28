"""A Python reader of the export's card data: the twin of static/export_card.js, so tests can decode
the data embedded in an exported page and check it against the bundle."""

from __future__ import annotations

import gzip
import json
import re
import struct

import numpy as np

from build_map.render.export.cards import DATA_ELEMENT_ID, MAGIC, TOKEN_LISTS
from build_map.render.export.codec import GROUP_BITS, TEXT_ALPHABET

_BASE = len(TEXT_ALPHABET)


def huffman_decode(data: np.ndarray, start_bit: int, end_bit: int, counts: list[int]) -> list[int]:
    """Symbols coded in bits [start_bit, end_bit) of ``data`` (zlib puff's canonical decoder)."""
    out = []
    code = first = index = 0
    length = 0
    for i in range(start_bit, end_bit):
        code |= (int(data[i >> 3]) >> (7 - (i & 7))) & 1
        length += 1
        count = counts[length] if length < len(counts) else 0
        if code - count < first:
            out.append(index + code - first)
            code = first = index = length = 0
        else:
            index += count
            first = (first + count) << 1
            code <<= 1
    return out


def decode_text(text: str, n_bytes: int) -> bytes:
    """Inverse of :func:`encode_text`; characters outside the alphabet (line breaks) are skipped."""
    lookup = np.full(128, -1, dtype=np.int32)
    lookup[np.frombuffer(TEXT_ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(_BASE)
    chars = lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    chars = chars[chars >= 0]
    values = chars[0::2] + _BASE * chars[1::2]
    bits = ((values[:, None] >> np.arange(GROUP_BITS)) & 1).astype(np.uint8).ravel()
    return np.packbits(bits, bitorder="little").tobytes()[:n_bytes]


def read_card_data(html: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays embedded in an exported page."""
    match = re.search(
        rf'<script type="application/octet-stream" id="{DATA_ELEMENT_ID}" data-encoding="base91x2" '
        r'data-bytes="(\d+)">([^<]*)</script>',
        html,
    )
    if match is None:
        raise ValueError("No card data in this page; was it written by `build-map export`?")
    return decode_card_data(decode_text(match.group(2), int(match.group(1))))


def decode_card_data(blob: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    raw = gzip.decompress(blob)
    if raw[:8] != MAGIC:
        raise ValueError("Not SAE card data (bad magic); was the page written by `build-map export`?")
    (header_len,) = struct.unpack("<I", raw[8:12])
    header = json.loads(raw[12 : 12 + header_len])
    base = 12 + header_len + (-(12 + header_len) % 8)
    arrays = {}
    for name, spec in header["arrays"].items():
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        arrays[name] = np.frombuffer(raw, dtype=dtype, count=spec["length"], offset=base + spec["offset"])
    return header, arrays


def cards(header: dict, arrays: dict[str, np.ndarray]) -> list[dict]:
    """Every card as plain Python, in map order (slow for big exports; for tests and inspection)."""
    act_starts = np.concatenate([[0], np.cumsum(arrays["ex_len"].astype(np.int64))])
    return [card(header, arrays, k, act_starts=act_starts) for k in range(len(arrays["feature"]))]


def card(
    header: dict, arrays: dict[str, np.ndarray], k: int, *, act_starts: np.ndarray | None = None
) -> dict:
    """The card of the k-th feature in the export, decoded as the browser does."""
    a = arrays
    if act_starts is None:
        act_starts = np.concatenate([[0], np.cumsum(a["ex_len"].astype(np.int64))])
    ids = huffman_decode(
        a["tokens"], int(a["token_bits"][k]), int(a["token_bits"][k + 1]), header["huffman_counts"]
    )
    tokens = [header["token_table"][i] for i in ids]
    bounds = np.cumsum([0, *[int(a[f"n_{name}"][k]) for name in TOKEN_LISTS]])
    pos = int(bounds[-1])
    examples = []
    for e in range(int(a["ex_offsets"][k]), int(a["ex_offsets"][k + 1])):
        n = int(a["ex_len"][e])
        quantised = a["ex_acts"][act_starts[e] : act_starts[e] + n]
        peak = float(a["ex_peak"][e])
        act_bits = a["ex_peak"][e : e + 1].view(a["ex_act_xor_peak"].dtype) ^ a["ex_act_xor_peak"][e]
        examples.append(
            {
                "act": float(act_bits.view(a["ex_peak"].dtype)[0]),
                "tokens": tokens[pos : pos + n],
                "acts": (quantised.astype(np.float32) * (peak / 255)).tolist(),
                "quantised": quantised.tolist(),
            }
        )
        pos += n
    n0, n1 = int(a["neighbor_offsets"][k]), int(a["neighbor_offsets"][k + 1])
    return {
        "feature": int(a["feature"][k]),
        "label": header["labels"][k],
        "clusters": [names[int(a[f"cluster_{lv}"][k])] for lv, names in enumerate(header["cluster_names"])],
        "density": float(a["density"][k]),
        "max_act": float(a["max_act"][k]),
        "mean_act": float(a["mean_act"][k]),
        "detection": float(a["detection"][k]) if "detection" in a else float("nan"),
        **{name: tokens[bounds[i] : bounds[i + 1]] for i, name in enumerate(TOKEN_LISTS)},
        "examples": examples,
        "neighbors": a["neighbors"][n0:n1].astype(np.int64).tolist(),
    }
