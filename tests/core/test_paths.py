"""The one path policy: roots, `..`, symlinks out of a root, hub ids that are really paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.paths import PathPolicy, PathRefused, SpecPath, is_hub_id


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root, models, outside = tmp_path / "data", tmp_path / "models", tmp_path / "outside"
    for d in (root, models, outside):
        d.mkdir()
    (root / "ok.csv").write_text("text,label\nhello,World\n")
    (outside / "secret.csv").write_text("root:x:0:0\n")
    (root / "escape").symlink_to(outside / "secret.csv")
    return {"root": root, "models": models, "outside": outside}


def policy(t, open_access=False) -> PathPolicy:
    return PathPolicy(data_roots=(t["root"],), model_roots=(t["models"],), open_access=open_access)


def test_a_file_under_a_root_is_allowed(tree):
    policy(tree).check(SpecPath("train.path", str(tree["root"] / "ok.csv")))


@pytest.mark.parametrize("value", ["{outside}/secret.csv", "{root}/../outside/secret.csv", "{root}/escape",
                                   "/etc/passwd", "{root}/missing/../../outside/secret.csv", "~/.bashrc"])
def test_paths_out_of_the_roots_are_refused_naming_the_field_not_the_content(tree, value):
    v = value.format(**tree)
    with pytest.raises(PathRefused) as e:
        policy(tree).check(SpecPath("train.classes_file", v))
    assert e.value.field == "train.classes_file" and "NEWSLORA_DATA_ROOTS" in str(e.value)
    assert "root:x" not in str(e.value)


def test_missing_and_existing_paths_outside_get_the_same_answer(tree):
    msgs = set()
    for v in ("/root", "/root/nonexistent"):
        with pytest.raises(PathRefused) as e:
            policy(tree).check(SpecPath("tokenizer", v, kind="model"))
        msgs.add(str(e.value))
    assert len(msgs) == 1


def test_models_need_a_model_root(tree):
    (tree["models"] / "m").mkdir()
    policy(tree).check(SpecPath("model", str(tree["models"] / "m"), kind="model"))
    with pytest.raises(PathRefused):
        policy(tree).check(SpecPath("model", str(tree["root"]), kind="model"))


@pytest.mark.parametrize("value", ["/srv/outside/secret.csv", "../x/y", "./a/b", "~/a", "a/../b"])
def test_a_local_path_is_never_a_hub_id(tree, value):
    for open_access in (False, True):
        with pytest.raises(PathRefused, match="hub id"):
            policy(tree, open_access).check(SpecPath("train.path", value, hub=True))


def test_hub_ids_pass_as_hub_ids(tree, monkeypatch):
    monkeypatch.chdir(tree["outside"])
    assert is_hub_id("fancyzhx/ag_news")
    policy(tree).check(SpecPath("train.path", "fancyzhx/ag_news", hub=True))


def test_a_relative_path_that_exists_is_not_a_hub_id(tree, monkeypatch):
    monkeypatch.chdir(tree["root"].parent)
    assert not is_hub_id("outside/secret.csv")


def test_single_user_mode_allows_local_paths(tree):
    policy(tree, open_access=True).check(SpecPath("train.path", str(tree["outside"] / "secret.csv")))
