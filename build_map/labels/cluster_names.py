"""Name clusters from their members' feature labels with class-based TF-IDF (no LLM).

Each cluster is one "class document": the set of its members' labels. A term (a word, or two
adjacent content words) scores ``tf(t, c) * log(1 + A / f(t))`` (c-TF-IDF, as in BERTopic), where
tf counts the members of c whose label holds t, f(t) counts all features whose label holds t, and
A is the mean number of term occurrences per cluster. A name is the best term plus, when it
scores nearly as well, a second one ("python, code"), at most ``max_words`` words.

Names are made distinct within a level: clusters that would share a name get their next best
terms appended (the largest keeps the plain name), then a numeric suffix as a last resort.
``name_levels`` names every level; a child then prefers terms its parent's name does not
already say, so zooming in shows something new.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from build_map.labels.text import DISCOURSE_WORDS, english_stopwords

WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
AUTO_LABEL_COUNTER = re.compile(r"\s·\d+$")  # "'of' ·7": automatic labels made unique, not a topic

# Words that carry no topic in feature labels ("References to ...", "Tokens in ...").
LABEL_BOILERPLATE = frozenset(
    {
        "feature",
        "features",
        "token",
        "tokens",
        "word",
        "words",
        "text",
        "texts",
        "concept",
        "concepts",
        "related",
        "relating",
        "reference",
        "references",
        "referring",
        "mention",
        "mentions",
        "mentioning",
        "various",
        "usage",
        "use",
        "used",
        "using",
        "context",
        "contexts",
        "instance",
        "instances",
        "specific",
        "particular",
        "terms",
        "term",
        "phrase",
        "phrases",
        "example",
        "examples",
        "typically",
        "especially",
        "including",
        "involving",
        "like",
        "within",
    }
)


def _stopwords() -> frozenset[str]:
    return english_stopwords() | LABEL_BOILERPLATE | DISCOURSE_WORDS


@dataclass
class _Candidate:
    term: str
    words: frozenset[str]
    score: float


@dataclass(frozen=True)
class _LabelIndex:
    """Terms of every feature label, extracted once and shared by all levels."""

    vocab: list[str]
    doc_term: sparse.csr_matrix  # (n_features, n_terms): 1 where feature i's label holds term t
    surface: dict[str, str]  # lower-cased word -> its most common spelling ("DNA", "Python")
    words: list[list[str]]  # every label's lower-cased words, stopwords too (for the fallback name)


def _content_runs(words: list[str], stop: frozenset[str]) -> list[list[str]]:
    """Lower-cased content words, split into runs at stopwords (no bigram spans a stopword)."""
    runs: list[list[str]] = [[]]
    for word in words:
        if word in stop or (len(word) < 2 and not word.isdigit()):
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(word)
    return [r for r in runs if r]


def _index_labels(labels: Sequence[object]) -> _LabelIndex:
    stop = _stopwords()
    vocab: dict[str, int] = {}
    spellings: dict[str, Counter[str]] = {}
    rows, cols = [], []
    all_words: list[list[str]] = [[] for _ in labels]
    for i, label in enumerate(labels):
        if not isinstance(label, str):  # None, NaN: no terms
            continue
        words = WORD.findall(AUTO_LABEL_COUNTER.sub("", label))
        all_words[i] = [w.lower() for w in words] or ([label.strip()] if label.strip() else [])
        for word in words:
            spellings.setdefault(word.lower(), Counter())[word] += 1
        terms: set[str] = set()
        for run in _content_runs([w.lower() for w in words], stop):
            terms.update(run)
            terms.update(f"{a} {b}" for a, b in zip(run, run[1:], strict=False) if a != b)
        rows.extend([i] * len(terms))
        cols.extend(vocab.setdefault(term, len(vocab)) for term in terms)
    doc_term = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(labels), len(vocab)))
    surface = {low: c.most_common(1)[0][0] for low, c in spellings.items()}
    return _LabelIndex(list(vocab), doc_term, surface, all_words)


def _class_term_counts(
    index: _LabelIndex, cluster_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, sparse.csr_matrix]:
    """(clusters, sizes, counts (n_clusters, n_terms)): members of each cluster holding each term."""
    clusters, inverse, sizes = np.unique(cluster_ids, return_inverse=True, return_counts=True)
    n = len(cluster_ids)
    member = sparse.csr_matrix((np.ones(n), (inverse, np.arange(n))), shape=(len(clusters), n))
    return clusters, sizes, (member @ index.doc_term).tocsr()


def _ranked_candidates(
    counts: sparse.csr_matrix, vocab: list[str], sizes: np.ndarray, top: int = 30
) -> list[list[_Candidate]]:
    """Best ``top`` c-TF-IDF terms per cluster, each held by >= 2 members (or all of a tiny cluster)."""
    term_total = np.asarray(counts.sum(axis=0)).ravel()
    mean_per_class = max(term_total.sum() / max(counts.shape[0], 1), 1.0)
    idf = np.log1p(mean_per_class / np.maximum(term_total, 1.0))
    ranked = []
    for c in range(counts.shape[0]):
        lo, hi = counts.indptr[c], counts.indptr[c + 1]
        terms, tf = counts.indices[lo:hi], counts.data[lo:hi]
        keep = tf >= min(2, sizes[c])
        terms, tf = terms[keep], tf[keep]
        # Longer terms (bigrams) win ties: they say more in the same space.
        score = tf * idf[terms] * np.array([1.0 + 0.1 * vocab[t].count(" ") for t in terms])
        best = np.lexsort((terms, -score))[:top]
        ranked.append(
            [_Candidate(vocab[terms[j]], frozenset(vocab[terms[j]].split()), float(score[j])) for j in best]
        )
    return ranked


def _compose(
    candidates: list[_Candidate], max_words: int, max_terms: int, min_relative_score: float
) -> list[_Candidate]:
    """Best term, plus following ones that score >= min_relative_score of it and add new words."""
    chosen: list[_Candidate] = []
    for cand in candidates:
        if len(chosen) >= max_terms:
            break
        if chosen and cand.score < min_relative_score * chosen[0].score:
            break
        if _fits(cand, chosen, max_words):
            chosen.append(cand)
    return _join_as_bigram(chosen, candidates)


def _join_as_bigram(chosen: list[_Candidate], candidates: list[_Candidate]) -> list[_Candidate]:
    """Two single words that also occur as a bigram read better as it: "French cities", not
    "cities, French"."""
    if len(chosen) != 2 or any(len(c.words) != 1 for c in chosen):
        return chosen
    pair = chosen[0].words | chosen[1].words
    bigram = next((c for c in candidates if c.words == pair and len(c.term.split()) == 2), None)
    return [_Candidate(bigram.term, bigram.words, chosen[0].score)] if bigram else chosen


def _fits(cand: _Candidate, chosen: list[_Candidate], max_words: int) -> bool:
    used = frozenset().union(*(c.words for c in chosen)) if chosen else frozenset()
    return not (cand.words & used) and len(used) + len(cand.words) <= max_words


def _render(chosen: list[_Candidate], surface: Mapping[str, str]) -> str:
    return ", ".join(" ".join(surface.get(w, w) for w in c.term.split()) for c in chosen)


def _penalise(candidates: list[_Candidate], avoid: frozenset[str], factor: float) -> list[_Candidate]:
    """Scale down terms that repeat words in ``avoid`` (the parent's name), then re-rank."""
    if not avoid:
        return candidates
    scaled = [_Candidate(c.term, c.words, c.score * (factor if c.words & avoid else 1.0)) for c in candidates]
    return sorted(scaled, key=lambda c: -c.score)


def name_clusters(
    member_labels: Sequence[str | None],
    cluster_ids: np.ndarray,
    *,
    max_words: int = 3,
    max_terms: int = 2,
    min_relative_score: float = 0.6,
    avoid: Mapping[int, str] | None = None,
    avoid_factor: float = 0.3,
) -> dict[int, str]:
    """Name each cluster from its members' labels; names are distinct within ``cluster_ids``.

    ``member_labels[i]`` is feature i's short label (None, NaN or "" are fine: they add nothing);
    ``cluster_ids[i]`` its cluster. ``avoid`` maps a cluster to text whose words its name should
    avoid (its parent's name): such terms score ``avoid_factor`` times less. Clusters with no
    usable label words are named "cluster <id>"; id -1 (noise), if present, is "unclustered".
    """
    cluster_ids = np.asarray(cluster_ids)
    if len(member_labels) != len(cluster_ids):
        raise ValueError(
            f"{len(member_labels)} labels for {len(cluster_ids)} cluster ids; pass one label per feature"
        )
    if len(cluster_ids) == 0:
        return {}
    options = {"max_words": max_words, "max_terms": max_terms, "min_relative_score": min_relative_score}
    return _name_level(_index_labels(member_labels), cluster_ids, avoid or {}, avoid_factor, **options)


def _name_level(
    index: _LabelIndex,
    cluster_ids: np.ndarray,
    avoid: Mapping[int, str],
    avoid_factor: float,
    max_words: int,
    max_terms: int,
    min_relative_score: float,
) -> dict[int, str]:
    clusters, sizes, counts = _class_term_counts(index, cluster_ids)
    ranked = [
        _penalise(cands, frozenset(w.lower() for w in WORD.findall(avoid.get(int(c), ""))), avoid_factor)
        for c, cands in zip(clusters, _ranked_candidates(counts, index.vocab, sizes), strict=True)
    ]
    chosen = [_compose(cands, max_words, max_terms, min_relative_score) for cands in ranked]
    for i, c in enumerate(clusters):
        if not chosen[i] and c != -1:
            chosen[i] = _shared_words(index, np.flatnonzero(cluster_ids == c))
    names = _distinct_names(clusters, sizes, ranked, chosen, index.surface, max_words)
    return {int(c): names[i] for i, c in enumerate(clusters)}


def _shared_words(index: _LabelIndex, members: np.ndarray) -> list[_Candidate]:
    """The fallback name of a region whose labels share no content word: the word most of its
    members' labels hold, stopwords and tokens such as "↵" included ("the", "of"), as one term."""
    counts = Counter(w for m in members.tolist() for w in dict.fromkeys(index.words[m]))
    if not counts:
        return [_Candidate("no labels", frozenset({"no", "labels"}), 0.0)]
    top = counts.most_common(1)[0][1]
    best = [w for w, n in counts.most_common(2) if n >= top / 2]
    return [_Candidate(" / ".join(best), frozenset(best), 0.0)]


def _base_name(cid: int, chosen: list[_Candidate], surface: Mapping[str, str]) -> str:
    if cid == -1:
        return "unclustered"
    return _render(chosen, surface)


def _distinct_names(
    clusters: np.ndarray,
    sizes: np.ndarray,
    ranked: list[list[_Candidate]],
    chosen: list[list[_Candidate]],
    surface: Mapping[str, str],
    max_words: int,
) -> list[str]:
    """Disambiguate equal names: add next-best terms (largest cluster keeps its name), then suffixes."""
    names = [_base_name(int(c), ch, surface) for c, ch in zip(clusters, chosen, strict=True)]
    for _ in range(4):  # a few rounds of adding one more term
        clashes = [g for g in _groups_by_name(names, sizes) if len(g) > 1]
        if not clashes:
            return names
        for group in clashes:
            for i in group[1:]:
                extra = next((c for c in ranked[i] if _fits(c, chosen[i], max_words + 2)), None)
                if extra is not None and clusters[i] != -1:
                    chosen[i] = [*chosen[i], extra]
                    names[i] = _render(chosen[i], surface)
    return _suffix_duplicates(names, sizes)


def _groups_by_name(names: list[str], sizes: np.ndarray) -> list[list[int]]:
    """Indices sharing each (case-insensitive) name, largest cluster first."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.lower(), []).append(i)
    return [sorted(g, key=lambda i: (-sizes[i], i)) for g in groups.values()]


def _suffix_duplicates(names: list[str], sizes: np.ndarray) -> list[str]:
    taken = {n.lower() for n in names}
    for group in _groups_by_name(names, sizes):
        for rank, i in enumerate(group[1:], start=2):
            k = rank
            while f"{names[i]} ({k})".lower() in taken:
                k += 1
            names[i] = f"{names[i]} ({k})"
            taken.add(names[i].lower())
    return names


def name_levels(
    member_labels: Sequence[str | None],
    levels: Sequence[np.ndarray],
    parents: Sequence[Mapping[int, int]] | None = None,
    *,
    max_words: int = 3,
    max_terms: int = 2,
    min_relative_score: float = 0.6,
    avoid_factor: float = 0.3,
) -> list[dict[int, str]]:
    """Names for every level (coarse to fine, as from ``cluster_levels``), distinct within each.

    With ``parents`` (from ``cluster_parents``), a cluster with siblings avoids the words of its
    parent's name, so the finer level says what distinguishes it. Labels are tokenised once.
    """
    if any(len(level) != len(member_labels) for level in levels):
        raise ValueError(f"every level needs one cluster id per label ({len(member_labels)} labels)")
    if not len(member_labels):
        return [{} for _ in levels]
    index = _index_labels(member_labels)
    options = {"max_words": max_words, "max_terms": max_terms, "min_relative_score": min_relative_score}
    named: list[dict[int, str]] = []
    for i, level in enumerate(levels):
        avoid: dict[int, str] = {}
        if parents is not None and i > 0:
            n_children = Counter(parents[i].values())
            avoid = {c: named[i - 1][p] for c, p in parents[i].items() if n_children[p] > 1}
        named.append(_name_level(index, np.asarray(level), avoid, avoid_factor, **options))
    return named
