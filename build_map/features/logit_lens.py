"""The logit lens of decoder directions: the tokens a direction's final-normed unembedding
promotes and suppresses most (read directly, not through the remaining layers)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from build_map.lm.hookpoints import final_norm
from build_map.lm.tokens import TokenText

_LOGIT_CHUNK_ELEMENTS = 2**26  # (features, vocab) logits held at once: 256 MiB in fp32


def logit_lens(
    model: nn.Module, directions: torch.Tensor, k: int, text: TokenText
) -> tuple[list[list[str]], list[list[str]]]:
    """Per direction (rows of ``directions``), the ``k`` tokens that its final-normed unembedding
    promotes most and least, as cleaned strings (``text = TokenText(tokenizer)``).

    Several ids can clean to the same string (" yes", "yes"), so 3k candidates are ranked and
    deduplicated. The unknown token, a padding token distinct from EOS and unembedding rows past the
    tokenizer's vocabulary are never listed.
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(head.parameters())
    vocab = int(param.shape[0])
    n_cand = min(3 * k, vocab)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // vocab)
    excluded = unlisted_ids(text.tokenizer, vocab)
    top_ids, bottom_ids = [], []
    chunks = range(0, directions.shape[0], rows)
    for start in tqdm(chunks, desc="Logit lens", unit="chunk", disable=len(chunks) < 4):
        logits = head(norm(directions[start : start + rows].to(param.device, param.dtype))).float()
        logits[:, excluded] = math.nan  # (rows, vocab)
        top_ids.append(torch.where(logits.isnan(), -math.inf, logits).topk(n_cand, dim=1).indices.cpu())
        bottom_ids.append(
            torch.where(logits.isnan(), math.inf, logits).topk(n_cand, dim=1, largest=False).indices.cpu()
        )
    top, bottom = torch.cat(top_ids), torch.cat(bottom_ids)
    clean = text.clean(torch.unique(torch.cat([top.flatten(), bottom.flatten()])).tolist())
    for token_id in excluded:
        clean[token_id] = ""
    return _dedupe_rows(top, clean, k), _dedupe_rows(bottom, clean, k)


def unlisted_ids(tokenizer, vocab: int) -> list[int]:
    """Ids no token list shows: unembedding rows past the tokenizer, the unknown token, a padding
    token that is not EOS or BOS."""
    ids = set(range(len(tokenizer), vocab))  # unembedding rows padded past the tokenizer
    if getattr(tokenizer, "unk_token_id", None) is not None:
        ids.add(int(tokenizer.unk_token_id))
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and pad not in (tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)):
        ids.add(int(pad))
    return sorted(i for i in ids if i < vocab)


def _dedupe_rows(ids: torch.Tensor, clean: dict[int, str], k: int) -> list[list[str]]:
    out = []
    for row in ids.tolist():
        texts = [clean[i] for i in row if clean[i]]
        out.append(list(dict.fromkeys(texts))[:k])
    return out
