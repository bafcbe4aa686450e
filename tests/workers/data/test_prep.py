"""Data preparation: the shared AG News files end to end, cleaning, splits and caps, every kind of bad input."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from core.context import JobCancelled, LocalContext
from workers.data.prep import (PrepError, clean_text, load_records, prepare_dataset, read_meta, token_lengths)
from workers.modeling.prompts import default_instruction, render_prompt
from core.specs.prep import AG_NEWS_LABELS, PrepSpec, SourceSpec

LABELS = list(AG_NEWS_LABELS)


def ag_spec(ag_news_dir: Path, **kw) -> PrepSpec:
    return PrepSpec(train=SourceSpec(path=str(ag_news_dir / "train.jsonl")),
                    test=SourceSpec(path=str(ag_news_dir / "test.csv")), **kw)


def all_records(d: Path) -> dict[str, list[dict]]:
    return {s: load_records(d, s) for s in ("train", "validation", "test")}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def good_rows(n: int = 12) -> list[dict]:
    """n distinct short articles, labels cycling through the four classes."""
    return [{"text": f"Article number {i} about {LABELS[i % 4]} things", "label": i % 4} for i in range(n)]


def small_spec(train: Path, **kw) -> PrepSpec:
    src = kw.pop("source", {})
    return PrepSpec(train=SourceSpec(path=str(train), **src), test=None, **kw)


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a run left in parent: the out_dir itself or a temp folder beside it."""
    return sorted(p.name for p in parent.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def prepared(ag_news_dir, tmp_path_factory) -> tuple[Path, dict, LocalContext]:
    out = tmp_path_factory.mktemp("prep") / "ag_news"
    ctx = LocalContext()
    meta = prepare_dataset(ag_spec(ag_news_dir), out, ctx)
    return out, meta, ctx


# --- the shared AG News files ------------------------------------------------------------------------

def test_counts_per_class_and_split(prepared):
    out, meta, _ = prepared
    recs = all_records(out)
    # test.csv: 1,900 a class (README); nothing in it is dropped
    assert meta["counts"]["test"] == {name: 1900 for name in LABELS}
    assert Counter(r["output"] for r in recs["test"]) == {name: 1900 for name in LABELS}
    # train.jsonl: 7,791 rows; one of them is a test article once both are cleaned, and is dropped from train
    assert meta["dropped"] == {"in_test": 1}
    assert meta["dropped_by_source"] == {"train": {"in_test": 1}}
    assert len(recs["train"]) + len(recs["validation"]) == 7791 - 1
    assert meta["sources"]["train"]["rows_read"] == 7791 and meta["sources"]["test"]["rows_read"] == 7600
    assert meta["sources"]["test"]["format"] == "agnews_csv" and meta["sources"]["train"]["format"] == "jsonl"
    for split, records in recs.items():
        assert meta["splits"][split]["records"] == len(records)
        assert Counter(meta["counts"][split]) == Counter(r["output"] for r in records)


def test_validation_is_stratified(prepared):
    out, meta, _ = prepared
    pool = Counter()
    for split in ("train", "validation"):
        pool.update(meta["counts"][split])
    for name in LABELS:  # 5% of each class, rounded
        assert meta["counts"]["validation"][name] == int(0.05 * pool[name] + 0.5)
    assert 380 <= len(load_records(out, "validation")) <= 395


def test_records_carry_instruction_labels_and_ids(prepared):
    out, meta, _ = prepared
    recs = all_records(out)
    instruction = default_instruction(LABELS)
    assert meta["instruction"] == instruction and meta["template"] == "alpaca"
    assert meta["label_map"] == {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}
    ids = [r["id"] for rs in recs.values() for r in rs]
    assert len(ids) == len(set(ids))
    for r in recs["test"][:50] + recs["train"][:50]:
        assert set(r) == {"id", "instruction", "input", "output", "label_id"}
        assert r["instruction"] == instruction
        assert r["output"] == LABELS[r["label_id"]]
    # test.csv line 1 is class 3 = Business (classes.txt is 1-based); train.jsonl labels are 0-based
    first = recs["test"][0]
    assert first["id"] == "test-1" and first["output"] == "Business" and first["label_id"] == 2
    assert first["input"] == ("Fears for T N pension after talks Unions representing workers at Turner Newall say "
                              "they are 'disappointed' after talks with stricken parent firm Federal Mogul.")


def test_cleaned_inputs_of_real_rows(prepared):
    out, _, _ = prepared
    recs = all_records(out)
    by_id = {r["id"]: r for rs in recs.values() for r in rs}
    # test.csv line 2: "A second\team ... the  #36;10 million ... contest for\privately"
    assert by_id["test-2"]["input"] == (
        "The Race is On: Second Private Team Sets Launch Date for Human Spaceflight (SPACE.com) SPACE.com - "
        "TORONTO, Canada -- A second team of rocketeers competing for the $10 million Ansari X Prize, a contest "
        "for privately funded suborbital space flight, has officially announced the first launch date for its "
        "manned rocket.")
    assert by_id["test-2"]["output"] == "Sci/Tech"
    # train.jsonl line 1: "M amp;G #39;s McLintock ... the insurer #39;s chief ... the group #39;s "
    assert by_id["train-1"]["input"] == (
        "M&G's McLintock touted as potential Bloomer successor Leading Prudential shareholders will this week "
        "attempt to garner support for a campaign to replace the insurer's chief executive, Jonathan Bloomer, "
        "and Michael McLintock, who runs the group's")
    assert by_id["train-1"]["output"] == "Business"
    for rs in recs.values():  # no escape survives anywhere
        for r in rs:
            assert "#39;" not in r["input"] and "quot;" not in r["input"] and "\\" not in r["input"]
            assert "  " not in r["input"] and r["input"] == r["input"].strip()


def test_meta_records_cleaning_hash_and_spec(prepared):
    out, meta, ctx = prepared
    assert meta["cleaned"]["#39;"] > 5000 and meta["cleaned"]["#36;"] > 100
    assert meta["cleaned"]["backslash_line_break"] > 1000 and meta["cleaned"]["quot;"] > 1000
    assert meta["spec"]["train"]["path"].endswith("train.jsonl")
    assert PrepSpec.model_validate(meta["spec"]) == ag_spec(Path(meta["spec"]["train"]["path"]).parent)
    assert len(meta["hash"]) == 64 and meta["token_lengths"] is None
    assert read_meta(out).model_dump(mode="json") == json.loads((out / "meta.json").read_text())
    phases = [e["message"] for e in ctx.events if e["message"].startswith("prep: ") and "total" in e["metrics"]]
    assert phases == ["prep: setup", "prep: load", "prep: clean", "prep: dedupe", "prep: split", "prep: tokenize",
                      "prep: write"]
    assert any(e["metrics"].get("reason") == "in_test" and e["metrics"]["count"] == 1 for e in ctx.events)


def test_no_overlap_between_splits(prepared):
    out, _, _ = prepared
    recs = all_records(out)
    texts = {s: {r["input"] for r in rs} for s, rs in recs.items()}
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert "train-4958" not in {r["id"] for rs in recs.values() for r in rs}  # the row that is also test-710


def test_caps_are_seeded_balanced_samples(ag_news_dir, tmp_path):
    spec = ag_spec(ag_news_dir, max_per_class=50, test_max_per_class=30, validation_fraction=0.1, seed=7)
    meta = prepare_dataset(spec, tmp_path / "a", LocalContext())
    assert meta["counts"]["train"] == {n: 50 for n in LABELS}
    assert meta["counts"]["validation"] == {n: 6 for n in LABELS}  # 10% of train + validation
    assert meta["counts"]["test"] == {n: 30 for n in LABELS}
    assert meta["dropped_by_source"]["test"] == {"over_cap": 7600 - 120}
    assert meta["dropped_by_source"]["train"] == {"in_test": 1, "over_cap": 7790 - 4 * 56}
    again = prepare_dataset(spec, tmp_path / "b", LocalContext())
    assert again["hash"] == meta["hash"]
    other = prepare_dataset(spec.model_copy(update={"seed": 8}), tmp_path / "c", LocalContext())
    assert other["hash"] != meta["hash"]
    ids = {d: {r["id"] for r in load_records(tmp_path / d, "test")} for d in ("a", "b", "c")}
    assert ids["a"] == ids["b"] != ids["c"]


def test_keep_raw_and_newline_breaks(ag_news_dir, tmp_path):
    spec = ag_spec(ag_news_dir, keep_raw=True, line_breaks="newline", test_max_per_class=5)
    prepare_dataset(spec, tmp_path / "d", LocalContext())
    by_id = {r["id"]: r for r in load_records(tmp_path / "d", "test")}
    with (ag_news_dir / "test.csv").open(encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for rec in by_id.values():
        row = rows[int(rec["id"].split("-")[1]) - 1]
        assert rec["raw"] == row[1] + " " + row[2]
    r2 = prepare_dataset(ag_spec(ag_news_dir, line_breaks="newline", test_max_per_class=1900), tmp_path / "e",
                         LocalContext())
    assert r2["counts"]["test"]["Sci/Tech"] == 1900
    rec = {r["id"]: r for r in load_records(tmp_path / "e", "test")}["test-2"]
    assert "A second\nteam of rocketeers" in rec["input"] and "$10 million" in rec["input"]


# --- clean_text --------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, cleaned, kinds", [
    ("the  #36;10 million", "the $10 million", {"#36;"}),
    ("the world #39;s poorest", "the world's poorest", {"#39;"}),
    ("to  quot;buy quot; on", 'to "buy" on', {"quot;"}),
    ("Inc. &lt;DELL.O&gt;, the", "Inc. <DELL.O>, the", {"lt;", "gt;"}),
    ("Johnson  amp; Johnson, AT&amp;T", "Johnson & Johnson, AT&T", {"amp;"}),
    ("convention  #151; California", "convention \u2014 California", {"#151;"}),
    ("women amp;apos;s triathlon", "women's triathlon", {"double_escape", "apos;"}),
    ("A second\\team of\\\\rocketeers", "A second team of rocketeers", {"backslash_line_break"}),
    ("merge in an \\$11 billion deal", "merge in an $11 billion deal", {"backslash_dollar"}),
    ("  many \t spaces\n here ", "many spaces here", {"whitespace"}),
    ("Camp; Japan; ranked #1; and; #100;", "Camp; Japan; ranked #1; and; #100;", set()),
])
def test_clean_text(raw, cleaned, kinds):
    text, counts = clean_text(raw)
    assert text == cleaned
    assert set(counts) - {"whitespace"} == kinds - {"whitespace"}
    if "whitespace" in kinds:
        assert counts["whitespace"] == 1


def test_clean_text_counts_each_escape():
    _, counts = clean_text("a #39;b #39;c  #36;1 quot;x")
    assert counts["#39;"] == 2 and counts["#36;"] == 1 and counts["quot;"] == 1


# --- bad input ---------------------------------------------------------------------------------------

def run_fails(spec: PrepSpec, tmp_path: Path, *, match: str) -> PrepError:
    """The run raises PrepError matching `match` and leaves no out_dir or temp folder behind."""
    with pytest.raises(PrepError, match=match) as e:
        prepare_dataset(spec, tmp_path / "out", LocalContext())
    assert leftovers(tmp_path, "out") == []
    return e.value


def run_skips(spec: PrepSpec, tmp_path: Path) -> tuple[dict, LocalContext]:
    ctx = LocalContext()
    meta = prepare_dataset(spec.model_copy(update={"on_bad_rows": "skip"}), tmp_path / "kept", ctx)
    return meta, ctx


def test_missing_file(tmp_path):
    err = run_fails(small_spec(tmp_path / "nope.jsonl"), tmp_path, match="does not exist")
    assert "nope.jsonl" in str(err)


def test_missing_classes_file(tmp_path, ag_news_dir):
    spec = small_spec(ag_news_dir / "test.csv", source={"classes_file": str(tmp_path / "classes.txt")})
    run_fails(spec, tmp_path, match="classes_file .*classes.txt does not exist")


def test_non_utf8_row(tmp_path):
    f = tmp_path / "latin1.jsonl"
    rows = [json.dumps(r).encode() for r in good_rows()]
    rows.insert(2, '{"text": "caf\u00e9 news", "label": 1}'.encode("latin-1"))
    f.write_bytes(b"\n".join(rows) + b"\n")
    err = run_fails(small_spec(f), tmp_path, match=r"latin1.jsonl line 3 is not UTF-8 \(byte 0xe9")
    assert "iconv" in str(err) and "on_bad_rows='skip'" in str(err)
    meta, ctx = run_skips(small_spec(f), tmp_path)
    assert meta["dropped"] == {"encoding": 1}
    assert sum(meta["splits"][s]["records"] for s in ("train", "validation")) == 12
    assert any(e["metrics"].get("reason") == "encoding" and e["metrics"]["first_lines"] == [3] for e in ctx.events)


def test_utf16_file(tmp_path):
    f = tmp_path / "u16.jsonl"
    f.write_bytes("\n".join(json.dumps(r) for r in good_rows()).encode("utf-16"))
    run_fails(small_spec(f), tmp_path, match="u16.jsonl is UTF-16 text.*re-save it as UTF-8")


def test_misnamed_columns(tmp_path):
    f = write_jsonl(tmp_path / "named.jsonl", [{"body": r["text"], "topic": r["label"]} for r in good_rows()])
    err = run_fails(small_spec(f), tmp_path, match="text_columns")
    assert "'text', 'label'" in str(err) and "body, topic" in str(err)
    # with the column map it works
    meta = prepare_dataset(small_spec(f, source={"text_columns": ["body"], "label_column": "topic"}),
                           tmp_path / "ok", LocalContext())
    assert sum(meta["counts"]["train"].values()) + sum(meta["counts"]["validation"].values()) == 12


def test_csv_header_and_column_map(tmp_path):
    f = tmp_path / "news.csv"
    with f.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["title", "body", "topic"])
        for i, r in enumerate(good_rows()):
            w.writerow([f"Title {i}", r["text"], LABELS[r["label"]]])  # labels as names
    run_fails(small_spec(f), tmp_path, match=r"news.csv line 1: no column 'text', 'label' in the header "
                                             r"\(of 3 columns\)")  # the header itself is not quoted
    spec = small_spec(f, source={"text_columns": ["title", "body"], "label_column": "topic"}, validation_fraction=0)
    prepare_dataset(spec, tmp_path / "ok", LocalContext())
    recs = load_records(tmp_path / "ok", "train")
    assert recs[0] == {"id": "train-2", "instruction": default_instruction(LABELS),
                       "input": "Title 0 Article number 0 about World things", "output": "World", "label_id": 0}
    assert read_meta(tmp_path / "ok").label_source == "spec"  # AG News's names: its order, not sorted


def test_label_outside_the_map(tmp_path):
    rows = good_rows()
    rows[4]["label"] = 7
    f = write_jsonl(tmp_path / "labels.jsonl", rows)
    run_fails(small_spec(f), tmp_path, match=r"labels.jsonl line 5 has label 7, outside the label map \(ids 0-3\)")
    meta, _ = run_skips(small_spec(f), tmp_path)
    assert meta["dropped"] == {"unknown_label": 1}
    rows[4]["label"] = "Weather"
    f = write_jsonl(tmp_path / "names.jsonl", rows)
    run_fails(small_spec(f), tmp_path, match="line 5 has label 'Weather', which is not one of label_names")


TOPICS = ["Weather", "Art", "Biology", "Chess", "Dance", "Economy", "Film", "Gardening", "History", "Islands",
          "Jazz", "Knitting", "Law", "Music", "Nutrition"]  # 15 string labels, not AG News's, not sorted


def write_topics_csv(path: Path, per_topic: int = 4) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(per_topic):
            for t in TOPICS:
                w.writerow([f"Story {i} on {t.lower()} and what came of it", f" {t} "])
    return path


def test_string_labels_are_taken_from_the_data(tmp_path):
    f = write_topics_csv(tmp_path / "topics.csv")
    ctx = LocalContext()
    meta = prepare_dataset(small_spec(f), tmp_path / "topics", ctx)
    assert meta["label_names"] == sorted(TOPICS) and meta["label_source"] == "data"
    assert meta["label_map"] == {t: i for i, t in enumerate(sorted(TOPICS))}
    assert read_meta(tmp_path / "topics").label_names == sorted(TOPICS)
    assert meta["instruction"] == default_instruction(sorted(TOPICS)) and meta["dropped"] == {}
    for name in TOPICS:  # every row kept, under its own label, in train or validation
        assert meta["counts"]["train"][name] + meta["counts"]["validation"][name] == 4
    rec = next(r for r in load_records(tmp_path / "topics", "train") if r["output"] == "Weather")
    assert rec["label_id"] == sorted(TOPICS).index("Weather") and "weather" in rec["input"]
    event = next(e for e in ctx.events if "label_names not given" in e["message"])
    assert event["metrics"]["label_names"] == sorted(TOPICS) and "15 labels found in the data" in event["message"]
    # Given label_names still rule: a label outside them is a bad row, as before.
    run_fails(small_spec(f, label_names=TOPICS[:14]), tmp_path, match="has label ' Nutrition ', which is not one")
    # A test source's labels count too.
    test = write_topics_csv(tmp_path / "test.csv", per_topic=1)
    both = PrepSpec(train=SourceSpec(path=str(f)), test=SourceSpec(path=str(test)), validation_fraction=0)
    assert prepare_dataset(both, tmp_path / "both", LocalContext())["counts"]["test"] == {t: 1 for t in sorted(TOPICS)}


def test_labels_from_the_data_that_cannot_be_labels(tmp_path):
    f = tmp_path / "one.jsonl"
    write_jsonl(f, [{"text": f"Story {i}", "label": "News"} for i in range(6)])
    run_fails(small_spec(f), tmp_path, match=r"every row has the label 'News' in column 'label'; a classifier needs")
    write_jsonl(f, [{"text": f"Story {i}", "label": f"headline {i}"} for i in range(300)])
    run_fails(small_spec(f), tmp_path, match=r"column 'label' holds 300 distinct values .* too many to be labels")


def test_one_based_labels_with_first_label_id(tmp_path):
    f = write_jsonl(tmp_path / "one.jsonl", [r | {"label": r["label"] + 1} for r in good_rows()])
    meta = prepare_dataset(small_spec(f, source={"first_label_id": 1}, validation_fraction=0), tmp_path / "o",
                           LocalContext())
    assert load_records(tmp_path / "o", "train")[0]["output"] == "World"
    assert meta["counts"]["train"] == {n: 3 for n in LABELS}
    run_fails(small_spec(f), tmp_path, match="line 4 has label 4, outside the label map")


def test_empty_text(tmp_path):
    rows = good_rows()
    rows[1]["text"] = "   \\  "
    f = write_jsonl(tmp_path / "empty.jsonl", rows)
    run_fails(small_spec(f), tmp_path, match="empty.jsonl line 2 has no text")
    assert run_skips(small_spec(f), tmp_path)[0]["dropped"] == {"empty_text": 1}


def test_rows_with_extra_or_missing_fields(tmp_path, ag_news_dir):
    lines = (ag_news_dir / "test.csv").read_text(encoding="utf-8").splitlines()[:20]
    lines[3] = lines[3] + ',"an extra field"'
    lines[6] = '"2","only a title"'
    f = tmp_path / "test.csv"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "classes.txt").write_text((ag_news_dir / "classes.txt").read_text())
    run_fails(small_spec(f), tmp_path,
              match=r"test.csv line 4 has 4 fields, expected 3 \(class index, title, description\)")
    meta, _ = run_skips(small_spec(f), tmp_path)
    assert meta["dropped"] == {"field_count": 2} and meta["sources"]["train"]["format"] == "agnews_csv"
    # a JSONL row lacking its label is a missing field
    rows = good_rows()
    del rows[3]["label"]
    g = write_jsonl(tmp_path / "nolabel.jsonl", rows)
    run_fails(small_spec(g), tmp_path, match="nolabel.jsonl line 4 has no 'label' field")


def test_bad_json_and_blank_lines(tmp_path):
    lines = [json.dumps(r) for r in good_rows()]
    lines[2] = '{"text": "cut off'
    lines.insert(5, "")
    lines[7] = '["a", "list"]'
    f = write_jsonl(tmp_path / "broken.jsonl", lines)
    run_fails(small_spec(f), tmp_path, match="broken.jsonl line 3 is not valid JSON")
    meta, _ = run_skips(small_spec(f), tmp_path)
    assert meta["dropped"] == {"bad_json": 1, "blank_line": 1, "not_an_object": 1}


def test_binary_file_named_jsonl(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_bytes(bytes(range(256)) * 40)
    run_fails(small_spec(f), tmp_path, match="data.jsonl line 1: NUL bytes; this is a binary file, not JSONL")
    g = tmp_path / "packed.jsonl"
    import gzip
    g.write_bytes(gzip.compress(b'{"text": "a", "label": 0}\n'))
    run_fails(small_spec(g), tmp_path, match="packed.jsonl is a gzip file, not JSONL text: unpack it")


def test_json_file_named_parquet(tmp_path):
    f = write_jsonl(tmp_path / "data.parquet", good_rows())
    run_fails(small_spec(f), tmp_path, match=r"data.parquet is not a Parquet file \(it looks like JSON text")
    g = tmp_path / "data2.csv"
    write_jsonl(g, good_rows())
    run_fails(small_spec(g), tmp_path, match="data2.csv looks like JSON, not CSV")


def test_ten_megabyte_article(tmp_path):
    rows = good_rows()
    rows[9]["text"] = "word " * 2_000_000  # 10 MB
    f = write_jsonl(tmp_path / "huge.jsonl", rows)
    run_fails(small_spec(f), tmp_path, match=r"huge.jsonl line 10 has 9,999,999 characters of text, over "
                                             r"max_text_chars=20,000")
    assert run_skips(small_spec(f), tmp_path)[0]["dropped"] == {"too_long": 1}
    # the same in a CSV field (beyond the csv module's default field size limit)
    g = tmp_path / "huge.csv"
    with g.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([[r["text"], r["label"]] for r in rows])
    run_fails(small_spec(g), tmp_path, match="huge.csv line 11 has 9,999,999 characters")


def test_skip_mode_with_nothing_usable_still_fails(tmp_path):
    f = write_jsonl(tmp_path / "all_bad.jsonl", [{"text": "x", "label": 9}] * 3)
    with pytest.raises(PrepError, match=r"all_bad.jsonl: no usable rows \(3 read; dropped: unknown_label: 3\)"):
        prepare_dataset(small_spec(f, on_bad_rows="skip"), tmp_path / "out", LocalContext())
    assert leftovers(tmp_path, "out") == []


def test_duplicates_within_a_split(tmp_path):
    rows = good_rows()
    rows.append(dict(rows[0]))  # exact duplicate
    rows.append({"text": "  " + rows[1]["text"].replace(" ", "  "), "label": 1})  # same once normalised
    rows.append({"text": rows[2]["text"], "label": 3})  # same text, another label: the first is kept
    f = write_jsonl(tmp_path / "dups.jsonl", rows)
    meta = prepare_dataset(small_spec(f, validation_fraction=0), tmp_path / "o", LocalContext())
    assert meta["dropped"] == {"duplicate": 2, "duplicate_label_conflict": 1}
    recs = load_records(tmp_path / "o", "train")
    assert len(recs) == 12 and {r["id"] for r in recs} == {f"train-{i}" for i in range(1, 13)}


# --- no partial artifact -----------------------------------------------------------------------------

def test_cancel_during_write_leaves_nothing(tmp_path, ag_news_dir):
    spec = ag_spec(ag_news_dir, test_max_per_class=10, max_per_class=10)
    ctx = LocalContext(cancel_after_checks=7)  # the check after the write phase, before the rename
    with pytest.raises(JobCancelled):
        prepare_dataset(spec, tmp_path / "out", ctx)
    assert leftovers(tmp_path, "out") == []
    assert ctx.events[-1]["message"] == "prep: write"


def test_failed_rerun_keeps_the_previous_dataset(tmp_path, ag_news_dir):
    spec = ag_spec(ag_news_dir, test_max_per_class=10, max_per_class=10)
    first = prepare_dataset(spec, tmp_path / "out", LocalContext())
    with pytest.raises(JobCancelled):
        prepare_dataset(spec.model_copy(update={"seed": 3}), tmp_path / "out", LocalContext(cancel_after_checks=7))
    assert leftovers(tmp_path, "out") == ["out"]
    assert read_meta(tmp_path / "out").hash == first["hash"]
    second = prepare_dataset(spec.model_copy(update={"seed": 3}), tmp_path / "out", LocalContext())
    assert read_meta(tmp_path / "out").hash == second["hash"] != first["hash"]
    assert leftovers(tmp_path, "out") == ["out"]


def test_out_dir_with_other_files_is_refused(tmp_path, ag_news_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="holds other files and no meta.json"):
        prepare_dataset(ag_spec(ag_news_dir), tmp_path / "out", LocalContext())
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_load_records_checks_the_artifact(tmp_path, prepared):
    out, _, _ = prepared
    with pytest.raises(PrepError, match="unknown split 'dev'"):
        load_records(out, "dev")
    with pytest.raises(PrepError, match="has no meta.json: it is not a prepared dataset"):
        load_records(tmp_path, "train")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with (copy / "test.jsonl").open("a") as fh:
        fh.write(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(PrepError, match="test.jsonl changed after it was prepared"):
        load_records(copy, "test")
    assert len(load_records(copy, "test", verify=False)) == 7601


# --- other source formats ----------------------------------------------------------------------------

def test_parquet_source_with_column_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = good_rows()
    pq.write_table(pa.table({"headline": [f"H{i}" for i in range(12)], "body": [r["text"] for r in rows],
                             "category": [LABELS[r["label"]] for r in rows]}), tmp_path / "news.parquet")
    run_fails(small_spec(tmp_path / "news.parquet"), tmp_path, match=r"news.parquet: no column 'text', 'label' "
                                                                      r"\(of 3 columns\)")
    spec = small_spec(tmp_path / "news.parquet", source={"text_columns": ["headline", "body"],
                                                         "label_column": "category"}, validation_fraction=0)
    prepare_dataset(spec, tmp_path / "ok", LocalContext())
    assert load_records(tmp_path / "ok", "train")[5] == {
        "id": "train-6", "instruction": default_instruction(LABELS), "input": "H5 Article number 5 about Sports things",
        "output": "Sports", "label_id": 1}


def test_hub_code_path_on_a_local_folder(tmp_path, monkeypatch):
    """format='hub' goes through datasets.load_dataset exactly as for fancyzhx/ag_news, here on a local folder.

    The labels are a ClassLabel in another order than label_names: they are mapped by name."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    order = ["Sports", "World", "Sci/Tech", "Business"]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=order)})
    hub = tmp_path / "ag_news_hub"
    hub.mkdir()
    rows = good_rows(16)
    for split, part in (("train", rows[:12]), ("test", rows[12:])):
        ds = datasets.Dataset.from_dict({"text": [r["text"] for r in part],
                                         "label": [order.index(LABELS[r["label"]]) for r in part]}, features=features)
        ds.to_parquet(str(hub / f"{split}.parquet"))
    spec = PrepSpec(train=SourceSpec(path=str(hub), format="hub", split="train"),
                    test=SourceSpec(path=str(hub), format="hub", split="test"), validation_fraction=0)
    meta = prepare_dataset(spec, tmp_path / "out", LocalContext())
    assert meta["sources"]["test"]["class_label_names"] == order
    test = load_records(tmp_path / "out", "test")
    assert [r["output"] for r in test] == [LABELS[r["label"]] for r in rows[12:]]
    assert [r["id"] for r in test] == ["test-1", "test-2", "test-3", "test-4"]
    assert meta["counts"]["train"] == {n: 3 for n in LABELS}
    # auto-detected: a folder is loaded through datasets too
    auto = PrepSpec(train=SourceSpec(path=str(hub), split="train"), test=None)
    assert prepare_dataset(auto, tmp_path / "auto", LocalContext())["sources"]["train"]["format"] == "hub"


def test_unreachable_hub_id(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as with no network, without waiting for it
    err = run_fails(PrepSpec(test=None), tmp_path, match=r"could not load 'fancyzhx/ag_news' split 'train'")
    assert "give their local path" in str(err)


# --- token lengths (the real SmolLM2 tokenizer) ------------------------------------------------------

@pytest.mark.smollm2
@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_token_lengths_match_per_record_encoding(smollm2_dir, ag_news_dir, tmp_path, template, monkeypatch):
    from transformers import AutoTokenizer
    spec = ag_spec(ag_news_dir, tokenizer=str(smollm2_dir), template=template, max_per_class=25,
                   test_max_per_class=25)
    meta = prepare_dataset(spec, tmp_path / "out", LocalContext())
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    lengths = {}
    for split in ("train", "validation", "test"):
        lengths[split] = sorted(len(tok(render_prompt(r["instruction"], r["input"], template=template,
                                                      tokenizer=tok) + r["output"])["input_ids"])
                                for r in load_records(tmp_path / "out", split))
    tl = meta["token_lengths"]
    assert tl["tokenizer"] == str(smollm2_dir) and tl["method"] == "prefix+suffix"
    for split, ls in lengths.items():
        assert tl[split]["max"] == ls[-1] and tl[split]["count"] == len(ls)
        assert tl[split]["p50"] == ls[(len(ls) + 1) // 2 - 1]  # nearest rank
    assert 90 < tl["test"]["p50"] < 160
    # both ways of counting agree with one encoding per record, row by row
    recs = load_records(tmp_path / "out", "test")
    args = (tok, recs[0]["instruction"], [r["input"] for r in recs], [r["output"] for r in recs])
    per_record = [len(tok(render_prompt(r["instruction"], r["input"], template=template, tokenizer=tok)
                          + r["output"])["input_ids"]) for r in recs]
    assert token_lengths(*args, template=template) == (per_record, "prefix+suffix")
    monkeypatch.setattr("workers.data.prep._prefix_is_separable", lambda tokenizer, prefix: False)
    assert token_lengths(*args, template=template) == (per_record, "full")
