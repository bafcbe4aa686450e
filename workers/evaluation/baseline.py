"""The classical baseline every evaluation shows: TF-IDF over word 1-2 grams + a linear SVM.

Fitted on the prepared dataset's train split when the evaluation runs (seconds on a CPU) and scored on
the same items as the language models, so a fine-tuned model's accuracy is read against what a linear
model on word counts gets from the same training articles. On the shared AG News articles (7,557
train) it scores about 89% on the official test split.

Predictions come back in the classify job's row shape (`workers.evaluation.metrics`'s module docstring), so the
evaluation's metrics and paired tests apply to them unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from workers.data.prep import load_records

BASELINE_NAME = "tfidf-svm"
METHOD = "TF-IDF (word 1-2 grams, sublinear tf) + linear SVM (LinearSVC, C=1)"


class BaselineUnavailable(ValueError):
    """The baseline cannot be fitted or scored on this data (the message says why)."""


@dataclass(frozen=True)
class BaselineCorpus:
    """What the baseline reads: the training texts with their labels, and the evaluated items' texts.

    Attributes:
        train_texts, train_labels: the train split, one label name per text.
        items: item id -> (text, gold label name), for the split the models were scored on.
        source: where it came from, for the evaluation document (e.g. the dataset folder and split).
    """

    train_texts: Sequence[str]
    train_labels: Sequence[str]
    items: dict[str, tuple[str, str]]
    source: str = ""


def load_corpus(dataset_dir: Path, split: str = "test") -> BaselineCorpus:
    """The train split and the evaluated split of a prepared dataset (records' `input` and `output`).

    Raises:
        workers.data.prep.PrepError: not a prepared dataset, an unknown split, or a changed file.
    """
    train = load_records(dataset_dir, "train")
    items = {str(r["id"]): (r["input"], r["output"]) for r in load_records(dataset_dir, split)}
    return BaselineCorpus(train_texts=[r["input"] for r in train], train_labels=[r["output"] for r in train],
                          items=items, source=f"{dataset_dir} (train -> {split})")


def fit_predict(train_texts: Sequence[str], train_labels: Sequence[str], texts: Sequence[str], *,
                c: float = 1.0, seed: int = 0) -> tuple[list[str], dict[str, Any]]:
    """Fit TF-IDF + LinearSVC on the training texts, predict a label for each of `texts`.

    Args:
        train_texts, train_labels: the training set (at least two distinct labels).
        texts: what to classify.
        c: the SVM's inverse regularisation strength.
        seed: LinearSVC's random state (its coordinate descent shuffles), for repeatable predictions.

    Returns:
        (one label per text, {"n_train", "n_features", "fit_s", "predict_s"}).

    Raises:
        BaselineUnavailable: no training texts, lengths that differ, or fewer than two classes.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer  # lazy: sklearn only when a baseline is fitted
    from sklearn.svm import LinearSVC

    if len(train_texts) != len(train_labels):
        raise BaselineUnavailable(f"{len(train_texts)} training texts but {len(train_labels)} labels")
    if len(set(train_labels)) < 2:
        raise BaselineUnavailable(f"the train split has {len(set(train_labels))} class(es) over "
                                  f"{len(train_texts)} texts: a classifier needs at least two")
    started = time.perf_counter()
    # sublinear_tf: 1 + log(count), so a word repeated in one article does not dominate it.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vectorizer.fit_transform(train_texts)  # (n_train, n_features) sparse
    svm = LinearSVC(C=c, random_state=seed).fit(x_train, list(train_labels))
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    labels = [str(y) for y in svm.predict(vectorizer.transform(texts))] if len(texts) else []
    return labels, {"n_train": len(train_texts), "n_features": int(x_train.shape[1]), "fit_s": round(fit_s, 3),
                    "predict_s": round(time.perf_counter() - started, 3)}


def baseline_predictions(corpus: BaselineCorpus, item_ids: Sequence[str]) -> tuple[list[dict[str, Any]],
                                                                                    dict[str, Any]]:
    """The baseline's predictions for the given items, as classify-job rows.

    Args:
        corpus: training data and the evaluated items' texts.
        item_ids: the items the models were scored on; ids the corpus lacks are left out (and counted).

    Returns:
        (rows {item_id, label, gold, probs None, follows_instruction None, error None},
         {name, method, source, n_train, n_features, fit_s, predict_s, n_items, n_not_found}).

    Raises:
        BaselineUnavailable: none of the items is in the corpus, or the train split cannot be fitted.
    """
    ids = [str(i) for i in item_ids]
    found = [i for i in ids if i in corpus.items]
    if not found:
        raise BaselineUnavailable(f"none of the {len(ids)} evaluated items is in {corpus.source or 'the corpus'}: "
                                  f"the baseline scores only items of a prepared dataset split")
    labels, info = fit_predict(corpus.train_texts, corpus.train_labels, [corpus.items[i][0] for i in found])
    rows = [{"item_id": i, "label": lab, "gold": corpus.items[i][1], "probs": None, "follows_instruction": None,
             "error": None} for i, lab in zip(found, labels)]
    return rows, {"name": BASELINE_NAME, "method": METHOD, "source": corpus.source, **info,
                  "n_items": len(found), "n_not_found": len(ids) - len(found)}
