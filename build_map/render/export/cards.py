"""The card data of an export: every visible feature's card as one compact binary blob.

    gzip( b"SAECARD1" | uint32 header length | header JSON | padding | arrays )

The header JSON holds the strings (labels, cluster names, the token table) and, for each numeric
array, its dtype, byte offset and length; arrays are little-endian and 8-byte aligned, so the
browser reads them as typed-array views without copying. Token strings are deduplicated through
one table ranked by frequency, and each card's token ids (top tokens, logit lens, examples) are
one run of canonical Huffman bits, decoded when the card opens. Activations are quantised to
uint8 relative to their example's maximum; per-example values are float16. static/export_card.js
is the browser's decoder; see codec.py for the codecs.
"""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from build_map.bundle.read import Bundle
from build_map.bundle.schema import EXAMPLES, FEATURES, BundleError
from build_map.render.export.codec import huffman_code_lengths, huffman_encode, length_counts

MAGIC = b"SAECARD1"
CARD_FORMAT_VERSION = 1
DATA_ELEMENT_ID = "sae-card-data"
TOKEN_LISTS = ("top_tokens", "top_logits", "bottom_logits")
_MAX_COUNT = 65535  # counts (tokens per example, logits per feature, ...) are stored as uint16


@dataclass(frozen=True)
class ExportConfig:
    max_examples: int = 10
    """Top examples kept per feature card (the bundle's "top" bucket, best first)."""
    hover_tokens: int = 5
    """Top tokens shown when hovering a point (the card shows them all)."""
    include_dead: bool = False
    """Also draw dead features on the map (grey, unlabelled); they get cards either way."""
    compress_level: int = 6
    """gzip level of the card data (9 saves little and takes much longer)."""

    def __post_init__(self) -> None:
        for name in ("max_examples", "hover_tokens"):
            if getattr(self, name) < 0:
                raise ExportError(f"--{name.replace('_', '-')} {getattr(self, name)}: give 0 or more.")
        if not 0 <= self.compress_level <= 9:
            raise ExportError(f"compress_level {self.compress_level}: give a gzip level from 0 to 9.")


class ExportError(BundleError):
    """The export cannot be written (e.g. the output exists and overwrite was not asked for)."""


class _Arrays:
    """Named little-endian arrays laid out 8-byte aligned after the header."""

    def __init__(self) -> None:
        self.spec: dict[str, dict] = {}
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        if values.dtype.byteorder == ">":
            values = values.astype(values.dtype.newbyteorder("<"))
        data = values.tobytes()
        self.spec[name] = {"dtype": values.dtype.name, "offset": self.size, "length": int(values.size)}
        pad = -len(data) % 8
        self.chunks.append(data + b"\0" * pad)
        self.size += len(data) + pad


@dataclass
class _TokenPart:
    """Token strings of one kind (top tokens, logits, example tokens) over the visible features."""

    dictionary: np.ndarray  # distinct strings (object array)
    codes: np.ndarray  # (n_tokens,) index into dictionary, -1 for null
    per_feature: np.ndarray  # (n_visible,) how many tokens each card has of this part


def encode_card_data(bundle: Bundle, config: ExportConfig, *, title: str = "") -> tuple[bytes, dict]:
    """gzip blob with the card of every visible feature, and a few counts about it."""
    features = bundle.features
    visible = ~features["hidden"].to_numpy(dtype=bool)
    ids = features["feature"].to_numpy()[visible].astype(np.int32)
    index_of = np.full(len(features), -1, dtype=np.int64)
    index_of[ids] = np.arange(len(ids))

    lists = pq.read_table(
        bundle.path / FEATURES,
        columns=[*TOKEN_LISTS, "neighbors"],
        read_dictionary=[f"{c}.list.element" for c in TOKEN_LISTS],
    ).filter(pa.array(visible))
    parts = [_token_part(lists[column], np.arange(len(ids)), len(ids)) for column in TOKEN_LISTS]
    if any(part.per_feature.max(initial=0) > _MAX_COUNT for part in parts):
        raise ExportError(
            f"A feature has more than {_MAX_COUNT} top tokens or logits; trim the bundle's lists."
        )
    examples = _top_examples(bundle, index_of, config.max_examples)
    parts.append(_token_part(examples["tokens"], examples["owner"], len(ids)))
    token_table, counts, bit_offsets, stream = _encode_tokens(parts)

    arrays = _Arrays()
    arrays.add("feature", ids)
    arrays.add("density", features["density"].to_numpy(dtype=np.float32)[visible])
    arrays.add("max_act", _compact_floats(features["max_act"].to_numpy(dtype=np.float32)[visible]))
    arrays.add("mean_act", _compact_floats(features["mean_act"].to_numpy(dtype=np.float32)[visible]))
    for score in ("detection", "fuzzing"):  # NaN: not scored
        arrays.add(score, features[score].to_numpy(dtype=np.float32)[visible])
    cluster_names = []
    for level, column in enumerate(bundle.cluster_columns):
        codes, names = pd.factorize(features[column][visible].fillna("").astype(str))
        arrays.add(f"cluster_{level}", codes.astype(np.uint16 if len(names) <= 1 << 16 else np.uint32))
        cluster_names.append([str(name) for name in names])
    for column, part in zip(TOKEN_LISTS, parts, strict=False):
        arrays.add(f"n_{column}", part.per_feature.astype(np.uint16))
    arrays.add("token_bits", bit_offsets)
    arrays.add("tokens", stream)
    _add_examples(arrays, examples, len(ids))
    _add_neighbors(arrays, lists["neighbors"], index_of)

    header = {
        "version": CARD_FORMAT_VERSION,
        "meta": _meta(bundle, title, n_visible=len(ids)),
        "labels": features["label"][visible].fillna("").astype(str).tolist(),
        "cluster_names": cluster_names,
        "token_table": token_table,
        "huffman_counts": counts,
        "arrays": arrays.spec,
    }
    header_bytes = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    prefix = MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes
    prefix += b"\0" * (-len(prefix) % 8)
    raw = b"".join([prefix, *arrays.chunks])
    stats = {"n_examples": len(examples["owner"]), "n_token_strings": len(token_table), "raw_bytes": len(raw)}
    return gzip.compress(raw, compresslevel=config.compress_level, mtime=0), stats


def _meta(bundle: Bundle, title: str, *, n_visible: int) -> dict:
    manifest = bundle.manifest
    return {
        "title": title,
        "n_features": int(bundle.n_features),
        "n_visible": n_visible,
        "hookpoint": str(manifest.get("hookpoint") or ""),
        "cluster_levels": bundle.cluster_columns,
    }


def _token_part(column: pa.ChunkedArray, owner: np.ndarray, n_visible: int) -> _TokenPart:
    """Dictionary-encode a list<string> column whose row i belongs to card ``owner[i]``."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if lengths.size and lengths.max() > _MAX_COUNT:
        raise ExportError(f"A list of {lengths.max()} tokens is too long to export (at most {_MAX_COUNT}).")
    flat = pa.chunked_array([pc.list_flatten(chunk) for chunk in column.chunks], type=column.type.value_type)
    if not pa.types.is_dictionary(flat.type):
        flat = pc.dictionary_encode(flat)
    flat = flat.unify_dictionaries()
    if flat.num_chunks:
        dictionary = flat.chunk(0).dictionary.to_numpy(zero_copy_only=False)
        codes = np.concatenate([c.indices.fill_null(-1).to_numpy(zero_copy_only=False) for c in flat.chunks])
    else:
        dictionary, codes = np.array([], dtype=object), np.zeros(0, dtype=np.int64)
    per_feature = np.bincount(owner, weights=lengths, minlength=n_visible).astype(np.int64)
    return _TokenPart(dictionary.astype(object), codes.astype(np.int64), per_feature)


def _encode_tokens(parts: list[_TokenPart]) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """One frequency-ranked string table; each card's ids as one run of Huffman bits.

    A card's run is its top tokens, top logits, bottom logits, then its examples' tokens.
    Returns the table, the Huffman code-length counts, bit offsets per card and the bitstream.
    """
    union = pd.Index(np.concatenate([[""], *[part.dictionary for part in parts]]).astype(object)).unique()
    global_codes = []
    for part in parts:
        mapping = np.append(union.get_indexer(part.dictionary), 0)  # code -1 (null) -> ""
        global_codes.append(mapping[part.codes])
    counts = np.bincount(np.concatenate(global_codes), minlength=len(union))
    by_frequency = np.argsort(-counts, kind="stable")
    rank = np.empty_like(by_frequency)
    rank[by_frequency] = np.arange(len(by_frequency))

    ordered = _card_major([rank[codes] for codes in global_codes], [part.per_feature for part in parts])
    lengths = huffman_code_lengths(counts[by_frequency])
    stream, bits = huffman_encode(ordered, lengths)
    per_card = np.sum([part.per_feature for part in parts], axis=0)
    card_of_token = np.repeat(np.arange(per_card.size), per_card)
    bit_offsets = np.zeros(per_card.size + 1, dtype=np.int64)
    np.cumsum(
        np.bincount(card_of_token, weights=bits, minlength=per_card.size).astype(np.int64),
        out=bit_offsets[1:],
    )
    if bit_offsets[-1] >= 1 << 32:
        raise ExportError("The token data is over 512 MB; export fewer examples (--max-examples).")
    table = [str(s) for s in union[by_frequency]]
    return table, length_counts(lengths), bit_offsets.astype(np.uint32), stream


def _card_major(codes: list[np.ndarray], per_feature: list[np.ndarray]) -> np.ndarray:
    """Interleave parts (each grouped by card, in card order) so each card's tokens are contiguous."""
    totals = np.sum(per_feature, axis=0)
    card_start = np.concatenate([[0], np.cumsum(totals)[:-1]])
    out = np.empty(int(totals.sum()), dtype=np.int64)
    before = np.zeros_like(totals)  # tokens of earlier parts within each card
    for part_codes, counts in zip(codes, per_feature, strict=True):
        owner = np.repeat(np.arange(counts.size), counts)
        part_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        within = np.arange(part_codes.size) - part_start[owner]
        out[card_start[owner] + before[owner] + within] = part_codes
        before += counts
    return out


def _top_examples(bundle: Bundle, index_of: np.ndarray, max_examples: int) -> dict:
    """The best ``max_examples`` "top" examples of each visible feature, read straight from Arrow."""
    path = bundle.path / EXAMPLES
    table = pq.read_table(
        path,
        columns=["feature", "rank", "bucket", "act", "tokens", "acts"],
        read_dictionary=["tokens.list.element"],
    )
    table = table.filter(pc.equal(table["bucket"], "top"))
    feature = table["feature"].to_numpy()
    in_range = (feature >= 0) & (feature < len(index_of))
    owner = np.where(in_range, index_of[np.where(in_range, feature, 0)], -1)
    keep = owner >= 0
    table, owner = table.filter(pa.array(keep)), owner[keep]
    key = owner * (1 << 32) + table["rank"].to_numpy().astype(np.int64)
    if np.any(np.diff(key) < 0):  # bundles are written in (feature, rank) order; sort if not
        order = np.argsort(key, kind="stable")
        table, owner = table.take(pa.array(order)), owner[order]
    first = np.searchsorted(owner, owner, side="left")
    keep = (np.arange(len(owner)) - first) < max_examples
    table, owner = table.filter(pa.array(keep)), owner[keep]
    lengths = pc.list_value_length(table["tokens"]).fill_null(0).to_numpy(zero_copy_only=False)
    act_lengths = pc.list_value_length(table["acts"]).fill_null(0).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, act_lengths):
        raise BundleError(f"{path}: an example has different numbers of tokens and acts; rebuild the bundle.")
    if lengths.size and lengths.max() > _MAX_COUNT:
        raise ExportError(
            f"{path}: an example has more than {_MAX_COUNT} tokens; trim the bundle's examples."
        )
    acts = pa.chunked_array([pc.list_flatten(c) for c in table["acts"].chunks], type=pa.float32())
    return {
        "owner": owner,
        "act": table["act"].to_numpy().astype(np.float32),
        "lengths": lengths.astype(np.int64),
        "tokens": table["tokens"],
        "acts": acts.fill_null(0).to_numpy().astype(np.float32),
    }


def _add_examples(arrays: _Arrays, examples: dict, n_visible: int) -> None:
    lengths = examples["lengths"]
    acts = np.nan_to_num(examples["acts"], nan=0.0, posinf=0.0, neginf=0.0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    peak = np.zeros(len(lengths), dtype=np.float32)
    nonempty = lengths > 0
    if nonempty.any():
        peak[nonempty] = np.maximum.reduceat(acts, starts[nonempty])
    act = np.nan_to_num(examples["act"], nan=0.0, posinf=0.0, neginf=0.0)
    peak = _compact_floats(np.maximum(peak, 0), also=act)
    act = act.astype(peak.dtype)
    scale = np.where(peak > 0, 255.0 / np.where(peak > 0, peak, 1).astype(np.float32), 0.0)
    arrays.add("ex_offsets", _offsets(np.bincount(examples["owner"], minlength=n_visible)))
    arrays.add("ex_peak", peak)
    # The focus activation usually equals the peak: stored as the XOR of the two bit patterns,
    # mostly zeros, which gzip all but removes.
    bits = np.uint16 if peak.dtype == np.float16 else np.uint32
    arrays.add("ex_act_xor_peak", act.view(bits) ^ peak.view(bits))
    arrays.add("ex_len", lengths.astype(np.uint16))
    arrays.add("ex_acts", np.clip(np.rint(acts * np.repeat(scale, lengths)), 0, 255).astype(np.uint8))


def _add_neighbors(arrays: _Arrays, neighbors: pa.ChunkedArray, index_of: np.ndarray) -> None:
    """Neighbours as feature ids, best first, without hidden or out-of-range ones."""
    counts = pc.list_value_length(neighbors).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pa.chunked_array([pc.list_flatten(c) for c in neighbors.chunks], type=neighbors.type.value_type)
    flat = flat.fill_null(-1).to_numpy().astype(np.int64)
    owner = np.repeat(np.arange(counts.size), counts)
    in_range = (flat >= 0) & (flat < len(index_of))
    keep = in_range & (index_of[np.where(in_range, flat, 0)] >= 0)
    arrays.add("neighbor_offsets", _offsets(np.bincount(owner[keep], minlength=counts.size)))
    arrays.add("neighbors", flat[keep].astype(np.uint16 if len(index_of) <= 1 << 16 else np.uint32))


def _compact_floats(values: np.ndarray, also: np.ndarray | None = None) -> np.ndarray:
    """float16 (3 significant digits, plenty to read) unless a value would overflow it."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    largest = max(np.abs(values).max(initial=0), np.abs(also).max(initial=0) if also is not None else 0)
    return values.astype(np.float16 if largest < 60000 else np.float32)


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.uint32)
    np.cumsum(counts, out=offsets[1:])
    return offsets
