"""Labels and their scores, as the build and ``build-map label`` / ``build-map score`` run them:
labellers see only the examples not held out, and the judge scores on the held-out ones."""

from __future__ import annotations

import logging

import pandas as pd

from build_map.labels.contexts import context_labels
from build_map.labels.judges import Judge, OfflineJudge
from build_map.labels.llm import SELF, AnswerCache, LLMJudge, cache_file, chat_for, llm_labels
from build_map.labels.scores import ScoreConfig, ScoreSummary, labelling_examples, score_labels
from build_map.labels.text import apply_labels
from build_map.lm.models import LoadedModel

logger = logging.getLogger(__name__)

OFFLINE = "offline"


def check_spec(spec: str, option: str) -> None:
    """Refuse a ``--labeler`` / ``--judge`` value that cannot work, before any slow stage runs."""
    if spec in (OFFLINE, SELF):
        return
    chat_for(spec)  # an endpoint: checks the URL and that a model name is set, sends nothing


def label_features(
    features: pd.DataFrame,
    examples: pd.DataFrame,
    imported: pd.Series | None = None,
    labeler: str = OFFLINE,
    loaded: LoadedModel | None = None,
) -> pd.DataFrame:
    """``features`` with ``label`` and ``label_source``: imported > LLM (unless ``labeler`` is
    offline) > the offline context labels."""
    seen = labelling_examples(examples)
    llm = None
    if labeler != OFFLINE:
        live = features.loc[~features["dead"].astype(bool), "feature"]
        llm = llm_labels(features, seen, chat_for(labeler, loaded), features=live)
    return apply_labels(features, context_labels(features, seen), imported=imported, llm=llm)


def judge_for(spec: str, loaded: LoadedModel | None = None) -> Judge:
    """``offline`` → the word-overlap judge; ``self`` or a URL → that LLM (answers cached)."""
    if spec == OFFLINE:
        return OfflineJudge()
    chat = chat_for(spec, loaded)
    return LLMJudge(chat, AnswerCache(cache_file(chat, "judge")))


def score_stage(
    features: pd.DataFrame, examples: pd.DataFrame, judge: Judge, cfg: ScoreConfig | None = None
) -> tuple[pd.DataFrame, ScoreSummary]:
    scored, summary = score_labels(features, examples, judge, cfg)
    logger.info("%s", summary.line())
    return scored, summary
