"""The classical baseline: TF-IDF + linear SVM on tiny data, and on the shared AG News articles."""
from __future__ import annotations

import time

import pytest

from workers.evaluation.baseline import (BASELINE_NAME, BaselineCorpus, BaselineUnavailable, baseline_predictions, fit_predict,
                              load_corpus)

SPORT = ["the striker scored a late goal", "the team won the cup final", "a goal in extra time won the match",
         "the coach praised the team after the match"]
MONEY = ["shares fell as profits dropped", "the bank raised interest rates", "stocks rallied on strong profits",
         "the central bank cut rates and shares rose"]


def tiny_corpus() -> BaselineCorpus:
    items = {"s1": ("a late goal won the cup", "Sports"), "m1": ("profits and shares rose at the bank", "Business"),
             "s2": ("the team coach and the striker", "Sports")}
    return BaselineCorpus(train_texts=SPORT + MONEY, train_labels=["Sports"] * 4 + ["Business"] * 4, items=items,
                          source="tiny")


def test_fit_predict_separates_two_topics():
    labels, info = fit_predict(SPORT + MONEY, ["Sports"] * 4 + ["Business"] * 4,
                               ["goal scored in the final", "rates and shares", "the bank and profits"])
    assert labels == ["Sports", "Business", "Business"]
    assert info["n_train"] == 8 and info["n_features"] > 20  # unigrams and bigrams
    assert info["fit_s"] >= 0 and info["predict_s"] >= 0


def test_predictions_are_classify_rows_in_item_order_and_unknown_ids_are_counted():
    rows, info = baseline_predictions(tiny_corpus(), ["m1", "s1", "nowhere", "s2"])
    assert [r["item_id"] for r in rows] == ["m1", "s1", "s2"]
    assert [(r["label"], r["gold"]) for r in rows] == [("Business", "Business"), ("Sports", "Sports"),
                                                        ("Sports", "Sports")]
    assert all(r["probs"] is None and r["error"] is None for r in rows)
    assert info["name"] == BASELINE_NAME and info["n_items"] == 3 and info["n_not_found"] == 1


def test_unusable_data_is_a_clear_error():
    with pytest.raises(BaselineUnavailable, match="none of the 1 evaluated items"):
        baseline_predictions(tiny_corpus(), ["elsewhere"])
    with pytest.raises(BaselineUnavailable, match="at least two"):
        fit_predict(SPORT, ["Sports"] * 4, ["a goal"])
    with pytest.raises(BaselineUnavailable, match="labels"):
        fit_predict(SPORT, ["Sports"], ["a goal"])


def test_on_the_shared_ag_news_articles(ag_news_dir, tmp_path):
    """Through a real prep artifact: fitted on the train split, scored on 4,000 official test articles."""
    from core.context import LocalContext
    from workers.data.prep import prepare_dataset
    from core.specs.prep import PrepSpec, SourceSpec
    spec = PrepSpec(train=SourceSpec(path=str(ag_news_dir / "train.jsonl")),
                    test=SourceSpec(path=str(ag_news_dir / "test.csv")), test_max_per_class=1000)
    prepare_dataset(spec, tmp_path / "ds", LocalContext(work_dir=tmp_path))
    corpus = load_corpus(tmp_path / "ds", "test")
    assert len(corpus.items) == 4000 and len(corpus.train_texts) > 7000
    started = time.perf_counter()
    rows, info = baseline_predictions(corpus, list(corpus.items))
    seconds = time.perf_counter() - started
    accuracy = sum(r["label"] == r["gold"] for r in rows) / len(rows)
    assert 0.86 < accuracy < 0.93, accuracy  # 88.9% on the full 7,600-article test split
    assert info["n_items"] == 4000 and info["n_not_found"] == 0
    assert seconds < 30, seconds  # ~2 s on an idle 2-core CPU
