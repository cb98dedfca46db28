"""Cluster names from member labels: c-TF-IDF terms, short, distinct within a level."""

from __future__ import annotations

import numpy as np

from build_map.labels.cluster_names import name_clusters, name_levels

TOPICS = {
    0: ["Python code", "Python functions", "code indentation in Python", "Python imports"],
    1: ["French cities", "Paris and Lyon", "cities in France", "French city names"],
    2: ["legal contracts", "contract clauses", "legal terms of a contract", "breach of contract"],
}


def topic_labels(per_topic: int = 12):
    labels, ids = [], []
    for cid, pool in TOPICS.items():
        for j in range(per_topic):
            labels.append(pool[j % len(pool)])
            ids.append(cid)
    return labels, np.array(ids)


def test_names_differ_between_topics_and_use_their_words():
    labels, ids = topic_labels()
    names = name_clusters(labels, ids)
    assert set(names) == {0, 1, 2}
    assert len(set(names.values())) == 3
    assert "python" in names[0].lower()
    assert "french" in names[1].lower() or "cities" in names[1].lower() or "city" in names[1].lower()
    assert "contract" in names[2].lower()
    for name in names.values():
        assert 1 <= len(name.replace(",", " ").split()) <= 3


def test_names_keep_the_labels_spelling():
    names = name_clusters(["DNA repair", "DNA replication", "DNA strands"], np.zeros(3, dtype=int))
    assert "DNA" in names[0]


def test_names_are_distinct_even_when_labels_collide():
    labels = ["numbers"] * 30 + ["numbers and dates"] * 10 + ["numbers", "numbers in tables"] * 5
    ids = np.repeat([0, 1, 2, 3, 4], 10)
    names = name_clusters(labels, ids)
    assert len(names) == 5
    assert len({n.lower() for n in names.values()}) == 5, names


def test_empty_and_missing_labels_do_not_crash():
    labels = ["", None, float("nan"), "the of and", "", "weather reports", "weather news"]
    ids = np.array([0, 0, 0, 0, 1, 2, 2])
    names = name_clusters(labels, ids)
    assert names[0] == "the / of" and names[1] == "no labels"  # never "cluster 0"
    assert "weather" in names[2].lower()
    assert name_clusters([], np.array([], dtype=int)) == {}
    assert name_clusters(["x"], np.array([-1])) == {-1: "unclustered"}


def test_name_levels_children_say_something_new():
    labels = (
        ["Python code", "Python loops"] * 5
        + ["Python strings", "Python string methods"] * 5
        + ["French cities"] * 10
    )
    coarse = np.array([0] * 20 + [1] * 10)
    fine = np.array([0] * 10 + [1] * 10 + [2] * 10)
    parents = [{0: -1, 1: -1}, {0: 0, 1: 0, 2: 1}]
    coarse_names, fine_names = name_levels(labels, [coarse, fine], parents)
    assert "python" in coarse_names[0].lower()
    assert "python" not in fine_names[0].lower() and "python" not in fine_names[1].lower()
    assert fine_names[0] != fine_names[1]
    assert fine_names[2] == coarse_names[1]  # an only child may keep its parent's name


def test_many_clusters_get_distinct_names_quickly():
    rng = np.random.default_rng(0)
    vocab = [f"topic{i}" for i in range(40)] + ["common", "shared"]
    labels = [" ".join(rng.choice(vocab, 3)) for _ in range(3000)]
    ids = rng.integers(0, 200, 3000)
    names = name_clusters(labels, ids)
    assert len(names) == len(np.unique(ids)) and len({n.lower() for n in names.values()}) == len(names)


def test_auto_label_counters_are_not_topics():
    """Labels made unique with " ·N" counters do not name the cluster after the counter."""
    labels = [f"'lot' ·{i}" for i in range(2, 8)] + ["'pizza' → eat", "'pasta' → eat", "'bread' → eat"]
    names = name_clusters(labels, np.array([0] * 6 + [1] * 3))
    assert names[0] == "lot" and not any(ch.isdigit() for ch in " ".join(names.values())), names
