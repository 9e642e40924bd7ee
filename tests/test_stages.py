"""Each stage alone, on archives and tables the tests build, with a failure case per input contract."""

from __future__ import annotations

import io
import multiprocessing
import random
import re
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest

from pipeline import build, evaluate, fit, ingest, split, textmodel
from pipeline.config import BuildConfig, EvaluateConfig, FitConfig, IngestConfig, SplitConfig
from tests.conftest import compose_config, review, write_archive


# -- ingest -------------------------------------------------------------------------------------------
def test_ingest_reads_the_archive_layout(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    frame = reviews.frame
    assert list(frame.columns) == ["text", "label", "rating", "split"]
    assert reviews.counts() == {"train": 24, "test": 24}  # train/unsup is not read
    assert set(frame["label"]) == {0, 1}
    assert (frame.loc[frame["label"] == 1, "rating"] >= 7).all()
    assert (frame.loc[frame["label"] == 0, "rating"] <= 4).all()
    assert len(reviews.digest) == 64


def test_ingest_folder_and_archive_agree(tiny_archive, tmp_path):
    with tarfile.open(tiny_archive) as archive:
        archive.extractall(tmp_path, filter="data")
    from_folder = ingest.ingest(IngestConfig(path=str(tmp_path)))
    from_archive = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    assert from_folder.digest == from_archive.digest
    pd.testing.assert_frame_equal(from_folder.frame, from_archive.frame)


@pytest.mark.parametrize("form", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("long_name", [False, True])
def test_every_tar_form_gives_the_same_reviews(tiny_archive, tmp_path, form, long_name):
    """A name over 100 characters is ustar's prefix field, GNU's long-name record or a PAX record; tarfile
    reads them all, and the reviews are the same."""
    with tarfile.open(tiny_archive) as source:
        members = [(member, source.extractfile(member).read()) for member in source if member.isfile()]
    path = tmp_path / "repacked.tar.gz"
    with tarfile.open(path, "w:gz", format=form) as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data))
        if long_name:
            deep = tarfile.TarInfo("folder/" * 20 + "aclImdb/train/pos/99_9.txt")
            deep.size = 6
            archive.addfile(deep, io.BytesIO(b"A gem."))
    reviews = ingest.ingest(IngestConfig(path=str(path))).frame
    assert len(reviews) == 48 + long_name and ("A gem." in set(reviews["text"])) == long_name
    expected = ingest.ingest(IngestConfig(path=str(tiny_archive))).frame
    pd.testing.assert_frame_equal(reviews[reviews["text"] != "A gem."].reset_index(drop=True), expected)


def test_digest_follows_content(tmp_path):
    first = ingest.ingest(IngestConfig(path=str(write_archive(tmp_path / "a.tar.gz", seed=1))))
    second = ingest.ingest(IngestConfig(path=str(write_archive(tmp_path / "b.tar.gz", seed=2))))
    again = ingest.ingest(IngestConfig(path=str(write_archive(tmp_path / "c.tar.gz", seed=1))))
    assert first.digest != second.digest
    assert first.digest == again.digest


def test_missing_archive_offline_says_where_to_put_it(tmp_path):
    target = tmp_path / "aclImdb_v1.tar.gz"
    cfg = IngestConfig(path=str(target), url="http://127.0.0.1:9/aclImdb_v1.tar.gz")  # nothing listens on port 9
    with pytest.raises(FileNotFoundError, match="Put the archive at") as error:
        ingest.ingest(cfg)
    assert str(target) in str(error.value)
    assert not list(tmp_path.iterdir())  # no partial download left behind


def test_a_read_or_download_shows_progress_on_a_terminal(tiny_archive, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown, piped = Terminal(), io.StringIO()  # on a terminal: the bar; into a pipe or file: nothing
    monkeypatch.setattr(sys, "stderr", piped)
    monkeypatch.setattr(sys, "stdout", shown)  # (in the worker that prepares the data, stderr is the log)
    ingest.read_archive(tiny_archive)
    ingest.download(tiny_archive.as_uri(), tmp_path / "copy.tar.gz", None)
    assert shown.getvalue().endswith(f"\rreading {tiny_archive.name}: 100.0%\n\rdownloading {tiny_archive.as_uri()}: 100.0%\n")
    assert piped.getvalue() == ""


def test_download_is_verified_and_kept(tiny_archive, tmp_path):
    target = tmp_path / "copy.tar.gz"
    ingest.download(tiny_archive.as_uri(), target, ingest.sha256_file(tiny_archive))
    assert ingest.sha256_file(target) == ingest.sha256_file(tiny_archive)
    assert (tmp_path / "copy.tar.gz.sha256").read_text() == f"{ingest.sha256_file(tiny_archive)}  copy.tar.gz\n"
    with pytest.raises(ValueError, match="sha256 does not match"):
        ingest.download(tiny_archive.as_uri(), tmp_path / "bad.tar.gz", "0" * 64)
    assert not (tmp_path / "bad.tar.gz").exists()


def test_missing_archive_without_download_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ingest.ingest(IngestConfig(path=str(tmp_path / "nothing.tar.gz"), download=False))


def test_a_users_unreadable_archive_says_what_is_wrong_and_what_to_give(tiny_archive, tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tiny_archive.read_bytes()[:300])
    with pytest.raises(ValueError, match="it is cut short") as error:
        ingest.ingest(IngestConfig(path=str(broken)))
    assert "complete aclImdb_v1.tar.gz or its extracted folder" in str(error.value)
    assert "download" not in str(error.value)  # the pipeline did not download it: fetching again is not the fix
    with zipfile.ZipFile(tmp_path / "aclImdb.zip", "w") as archive:
        archive.writestr("aclImdb/train/pos/0_9.txt", "A gem.")
    with pytest.raises(ValueError, match="it is a .zip archive: extract it"):
        ingest.ingest(IngestConfig(path=str(tmp_path / "aclImdb.zip")))


def test_a_table_given_as_the_archive_is_told_to_use_ingest_table(tmp_path):
    table = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["great film", "dull film"] * 4, "label": [1, 0] * 4,
                  "split": ["train"] * 4 + ["test"] * 4}).to_csv(table, index=False)
    with pytest.raises(ValueError) as error:
        ingest.ingest(compose_config([f"ingest.path={table}"]).ingest)
    fix = re.search(r"ingest=table ingest.path=\S+", str(error.value)).group(0).split()
    assert ingest.ingest(compose_config([f"ingest.path={table}", *fix]).ingest).counts() == {"train": 4, "test": 4}


def test_only_the_pipelines_own_download_is_to_be_downloaded_again(tiny_archive, tmp_path):
    target = ingest.download(tiny_archive.as_uri(), tmp_path / "data" / "aclImdb_v1.tar.gz", None)
    assert ingest.downloaded(target) and not ingest.downloaded(tiny_archive)
    target.write_bytes(target.read_bytes()[:300])  # changed since: cut short on disk
    with pytest.raises(ValueError, match="changed since the pipeline downloaded it: delete it and run again"):
        ingest.ingest(IngestConfig(path=str(target)))
    target.unlink()  # following the advice: the next run downloads it again
    assert ingest.ingest(IngestConfig(path=str(target), url=tiny_archive.as_uri(), sha256=None)).counts()["test"] == 24
    html = tmp_path / "page.html"
    html.write_text("<html>moved</html>")
    target.unlink()
    ingest.download(html.as_uri(), target, None)  # a URL that does not serve an archive, unchecked
    with pytest.raises(ValueError, match="exactly as the pipeline downloaded it: ingest.url does not serve"):
        ingest.ingest(IngestConfig(path=str(target)))


def test_archive_missing_a_class_names_the_folder(tmp_path):
    path = write_archive(tmp_path / "one_class.tar.gz", skip=("test/neg",))
    with pytest.raises(ValueError, match=f"no aclImdb/test/neg/ reviews in {re.escape(str(path))}"):
        ingest.ingest(IngestConfig(path=str(path)))
    with tarfile.open(path) as archive:
        archive.extractall(tmp_path / "folder", filter="data")
    with pytest.raises(ValueError, match="no aclImdb/test/neg/ reviews in"):
        ingest.ingest(IngestConfig(path=str(tmp_path / "folder")))


@pytest.mark.parametrize("content, message", [(b"   ", "is empty"), (b"caf\xe9", "not valid UTF-8")])
def test_bad_review_names_the_file(tmp_path, content, message):
    path = write_archive(tmp_path / "bad.tar.gz", overrides={"train/pos/3": content})
    with pytest.raises(ValueError, match=message) as error:
        ingest.ingest(IngestConfig(path=str(path)))
    assert "train/pos/3_" in str(error.value)


def test_table_source_with_and_without_split_column(tmp_path):
    frame = pd.DataFrame({"review": [f"good {i}" if i % 2 else f"bad {i}" for i in range(20)],
                          "y": [i % 2 for i in range(20)]})
    frame.to_csv(tmp_path / "no_split.csv", index=False)
    reviews = ingest.ingest(IngestConfig(source="table", path=str(tmp_path / "no_split.csv"),
                                         text_column="review", label_column="y", test_fraction=0.25), seed=3)
    assert reviews.counts() == {"train": 15, "test": 5}
    frame["split"] = ["test" if i < 6 else "train" for i in range(20)]
    frame.to_parquet(tmp_path / "with_split.parquet")
    reviews = ingest.ingest(IngestConfig(source="table", path=str(tmp_path / "with_split.parquet"),
                                         text_column="review", label_column="y"))
    assert reviews.counts() == {"train": 14, "test": 6}
    assert (reviews.frame["rating"] == -1).all()


@pytest.mark.parametrize("name, content, message", [
    ("t.csv", pd.DataFrame({"text": ["a", "b"]}), r"missing column\(s\) \['label'\]"),
    ("t.csv", pd.DataFrame({"text": ["a", "b"], "label": [0, 2]}), "must hold 0 or 1 only"),
    ("t.csv", pd.DataFrame({"text": ["a", ""], "label": [0, 1]}), r"1 rows with an empty text or no label.*: 2 \(empty text\)"),
    ("t.csv", "", r"t\.csv is empty: a table needs its columns named"),
    ("t.tsv", "\n\n", r"t\.tsv is empty"),
    ("t.csv", 'text,label\n"a, b",0\na, b,1\n', r"t\.csv: not a readable table \(.*line 3.*\); a field that holds the delimiter"),
    ("t.parquet", pd.DataFrame({"text": [1, 2], "label": [0, 1]}), r"t\.parquet: column 'text' holds numbers \(int64\), not "
                                                                 r"text; set ingest.text_column"),
    ("t.parquet", pd.DataFrame({"text": ["a", " "], "label": [0, 1]}), r"t\.parquet: 1 rows with an empty text or no "
                                                                      r"label, counting from 1: 2 \(empty text\)"),  # (no header)
    ("t.jsonl", '{"text": "a", "label": 0}\n{"text": 7, "label": 1}\n', r"t\.jsonl: 1 lines .*: line 2 \(int 7, not text\)"),
    ("t.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n', r"t\.jsonl: 1 lines that are not JSON objects.*: "
                                                                         r"line 3 \(not a JSON object .*skip_bad_rows=true"),
])
def test_table_source_rejects_bad_tables(tmp_path, name, content, message):
    """Each mistake in one line naming the file (its line or row, its column) and the fix."""
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        content.to_parquet(path) if name.endswith(".parquet") else content.to_csv(path, index=False)
    with pytest.raises(ValueError, match=message) as error:
        ingest.ingest(IngestConfig(source="table", path=str(path)))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("delimiter", ["\t", ";"])
def test_a_table_named_csv_is_read_with_the_delimiter_its_header_uses(tmp_path, delimiter):
    """A tab- (or semicolon-) separated file named .csv just works, reviews holding commas and all."""
    frame = labelled_reviews(12).assign(review=lambda f: f["review"] + ", truly")
    frame.to_csv(tmp_path / "reviews.csv", sep=delimiter, index=False)
    reviews = ingest.ingest(IngestConfig(source="table", path=str(tmp_path / "reviews.csv"), text_column="review",
                                         label_column="sentiment", positive_label="positive"))
    assert sorted(reviews.texts()) == sorted(frame["review"])


def test_a_broken_json_line_is_named_or_left_out_and_counted(tmp_path):
    frame = labelled_reviews(20)
    lines = frame.to_json(orient="records", lines=True).splitlines()
    lines[6] = lines[6][:-5]  # cut short: line 7
    # (with a byte-order mark, as some Windows tools write UTF-8: line 1 is read, as a CSV's header is)
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    cfg = IngestConfig(source="table", path=str(tmp_path / "reviews.jsonl"), text_column="review",
                       label_column="sentiment", positive_label="positive")
    with pytest.raises(ValueError, match=r"reviews\.jsonl: 1 lines that are not JSON objects.*: line 7 \(not a JSON object"):
        ingest.ingest(cfg)
    cfg.skip_bad_rows = True
    reviews = ingest.ingest(cfg)
    assert [where for where, _ in reviews.skipped] == ["line 7"]
    assert sorted(reviews.texts()) == sorted(frame["review"].drop(index=6))


def labelled_reviews(rows: int = 40) -> pd.DataFrame:
    """The common download's form: columns review and sentiment, labels positive/negative."""
    rng = random.Random(1)
    return pd.DataFrame({"review": [review(rng, i % 2 == 0) for i in range(rows)],
                         "sentiment": ["positive" if i % 2 == 0 else "negative" for i in range(rows)]})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_a_review_sentiment_table_in_any_format_maps_its_labels(tmp_path, suffix):
    frame, path = labelled_reviews(), tmp_path / f"imdb{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".tsv": lambda: frame.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True), ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    cfg = IngestConfig(source="table", path=str(path), text_column="review", label_column="sentiment")
    with pytest.raises(ValueError, match=r"must hold 0 or 1 only; found \['positive', 'negative'\].*ingest.positive_label"):
        ingest.ingest(cfg)
    cfg.positive_label = "positive"
    reviews = ingest.ingest(cfg)
    assert reviews.labels == {"positive": "positive", "negative": "negative"}
    by_text = dict(zip(reviews.texts(), reviews.frame["label"]))
    assert all(by_text[text] == int(label == "positive") for text, label in zip(frame["review"], frame["sentiment"]))
    assert sum(reviews.counts().values()) == len(frame)


def test_positive_label_refuses_a_column_of_more_than_two_values(tmp_path):
    frame = labelled_reviews()
    frame.loc[3, "sentiment"] = "neutral"
    frame.to_csv(tmp_path / "three.csv", index=False)
    cfg = IngestConfig(source="table", path=str(tmp_path / "three.csv"), text_column="review", label_column="sentiment",
                       positive_label="positive")
    with pytest.raises(ValueError, match=r"3 distinct values \['negative', 'neutral', 'positive'\]"):
        ingest.ingest(cfg)


def test_positive_label_names_a_number_as_the_file_writes_it_with_blank_labels_among_them(tmp_path):
    """A column of 1/0 with blank cells reads as floats (1.0, 0.0); ingest.positive_label=1 still names its 1s."""
    frame = labelled_reviews()
    frame["sentiment"] = (frame["sentiment"] == "positive").astype("Int64")
    frame.loc[[1, 4], "sentiment"] = pd.NA
    frame.to_csv(tmp_path / "stars.csv", index=False)
    cfg = IngestConfig(source="table", path=str(tmp_path / "stars.csv"), text_column="review", label_column="sentiment",
                       positive_label="1", skip_bad_rows=True)
    reviews = ingest.ingest(cfg)
    assert reviews.labels == {"positive": "1", "negative": "0"}
    assert [row for row, _ in reviews.skipped] == ["2", "5"]
    by_text = dict(zip(reviews.texts(), reviews.frame["label"]))
    assert all(by_text[text] == label for text, label in zip(frame["review"], frame["sentiment"]) if label is not pd.NA)


def test_empty_rows_are_named_or_left_out_and_listed(tmp_path):
    frame = labelled_reviews()
    empty = [2, 5, 9, 11, 20, 33, 38]  # 0-based: rows 3, 6, 10, 12, 21, 34, 39 of the file
    frame.loc[empty, "review"] = ["", "   ", None, "", "", "", ""]
    frame.to_csv(tmp_path / "holes.csv", index=False)
    cfg = IngestConfig(source="table", path=str(tmp_path / "holes.csv"), text_column="review", label_column="sentiment",
                       positive_label="positive")
    with pytest.raises(ValueError) as error:
        ingest.ingest(cfg)
    assert "7 rows with an empty text" in str(error.value) and "skip_bad_rows=true" in str(error.value)
    assert "3 (empty text), 6 (empty text), 10 (empty text), 12 (empty text), 21 (empty text), ..." in str(error.value)
    cfg.skip_bad_rows = True
    reviews = ingest.ingest(cfg)
    assert [int(row) for row, _ in reviews.skipped] == [row + 1 for row in empty]
    assert sum(reviews.counts().values()) == len(frame) - len(empty)
    assert not reviews.texts().str.strip().eq("").any()


def test_an_archive_with_an_empty_review_file_can_leave_it_out(tmp_path):
    path = write_archive(tmp_path / "bad.tar.gz", overrides={"train/pos/3": b"  ", "test/neg/1": b"caf\xe9"})
    reviews = ingest.ingest(IngestConfig(path=str(path), skip_bad_rows=True))
    assert reviews.counts() == {"train": 23, "test": 23}
    assert [(where.split("/", 2)[-1].split("_")[0], why[:12]) for where, why in reviews.skipped] == [
        ("pos/3", "the review i"), ("neg/1", "not valid UT")]


def test_keras_source_decodes_the_tutorial_data(monkeypatch):
    from keras.datasets import imdb

    data = ((np.array([[1, 14, 22, 2], [1, 15]], dtype=object), np.array([1, 0])),
            (np.array([[1, 22], [1, 14, 15]], dtype=object), np.array([0, 1])))
    monkeypatch.setattr(imdb, "load_data", lambda num_words: data)
    monkeypatch.setattr(imdb, "get_word_index", lambda: {"great": 11, "film": 12, "dull": 19})
    reviews = ingest.ingest(IngestConfig(source="keras"))
    assert reviews.frame["text"].tolist() == ["dull", "great film", "film", "great dull"]
    assert reviews.source == "keras.datasets.imdb"


# -- split --------------------------------------------------------------------------------------------
def test_split_holds_out_validation_from_train_only(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    parts = split.split(reviews.frame, SplitConfig(validation_size=8), seed=1)
    assert parts.sizes() == {"train": 16, "validation": 8, "test": 24}
    assert (parts.test["split"] == "test").all()
    assert set(parts.train["text"]).isdisjoint(parts.validation["text"])
    assert parts.validation["label"].nunique() == 2  # shuffled: not one class
    again = split.split(reviews.frame, SplitConfig(validation_size=8), seed=1)
    assert parts.validation["text"].tolist() == again.validation["text"].tolist()
    other = split.split(reviews.frame, SplitConfig(validation_size=8), seed=2)
    assert parts.validation["text"].tolist() != other.validation["text"].tolist()


def test_split_by_fraction(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    parts = split.split(reviews.frame, SplitConfig(validation_size=None, validation_fraction=0.25), seed=1)
    assert parts.sizes()["validation"] == 6


def test_split_that_leaves_no_training_data_is_an_error(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    with pytest.raises(ValueError, match="validation_size=24 leaves no training data"):
        split.split(reviews.frame, SplitConfig(validation_size=24), seed=1)


def vectorized_in_chunks(table, command, reviews, monkeypatch, capsys):
    """A table's texts stay in its file and are vectorized as read, chunk by chunk (here 64 rows), on a pool
    of 2 worker processes or in this one: the same vocabulary and ids, in uint16, as from the whole table in
    memory, for the CSV and the same table as Parquet; with the progress lines of a long stage."""
    from pipeline import chunks, console, tables

    assert "reading" not in capsys.readouterr().out  # the ingest above was short: no progress line
    monkeypatch.setattr(tables, "CHUNK_ROWS", 64)
    monkeypatch.setattr(chunks, "ROWS", 64)
    monkeypatch.setattr(console, "PROGRESS", (0.0, 0.0))  # every update a line, as a long stage shows them
    cfg = compose_config(command)
    pd.read_csv(table).to_parquet(table.with_suffix(".parquet"))
    as_parquet = ingest.ingest(compose_config(command + [f"ingest.path={table.with_suffix('.parquet')}"]).ingest)
    assert "text" not in reviews.frame.columns and as_parquet.digest == reviews.digest
    parts = split.split(reviews.frame, cfg.split, cfg.seed)
    whole = build.vectorize(chunks.with_texts(parts, reviews.table), cfg.build)  # the texts in memory
    assert sorted(whole.x_train.shape) == [256, 300]
    threads = threading.active_count()
    for each, workers in ((reviews, 2), (as_parquet, 0)):
        vocabulary, arrays = chunks.vectorize_table(split.split(each.frame, cfg.split, cfg.seed), each.table,
                                                    cfg.build, workers=workers)
        assert multiprocessing.active_children() == [] and threading.active_count() == threads  # (the pool ended)
        assert vocabulary == whole.vocabulary
        for got, expected in zip(arrays, (whole.x_train, whole.x_validation, whole.x_test)):
            assert got.dtype == np.uint16 and np.array_equal(got, expected)
    shown = capsys.readouterr().out
    assert re.search(r"reading IMDB_Dataset\.parquet: 192 reviews, [\d,]+ a second, \d+ s left", shown)
    assert re.search(r"vectorize: reading and encoding the reviews: [\d,]+ of 1,000 reviews, [\d,]+ a second, "
                     r"\d+ s left", shown)


ODD_REVIEWS = ["Great<BR/>film", "great<br   />FILM<br>ok<Br />", "  leading and trailing\t\n", "!!! ...", "<br />",
               "Café naïve 日本語 x\u00a0y e\u2028f — it's 10/10", "tab\tvertical\x0bfeed\x0cend\x1cgroup", "a", "b b"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_one_pass_over_a_table_gives_the_vocabulary_and_ids_of_the_texts_in_memory(tmp_path, monkeypatch, suffix):
    """The chunked pass's vocabulary and ids are exactly those of build.vectorize on the texts in memory (what the
    served model's tokenizer gives), for reviews longer and shorter than sequence_length kept from either end,
    every form of line break, non-ASCII text and whitespace, whitespace at the ends, reviews of no token, ties at
    the vocabulary's cut, a vocabulary past 2-byte ids, chunks whose tokens need 4-byte codes; pool or none."""
    from pipeline import chunks

    rng = random.Random(5)
    texts = [review(rng, i % 2 == 0) * rng.choice([1, 1, 4]) + " " + rng.choice(ODD_REVIEWS) for i in range(150)]
    texts[:len(ODD_REVIEWS)] = ODD_REVIEWS  # (alone too: some with no token at all)
    frame = pd.DataFrame({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    table = tmp_path / f"reviews{suffix}"
    frame.to_csv(table, index=False) if suffix == ".csv" else frame.to_parquet(table, index=False)
    monkeypatch.setattr(chunks, "ROWS", 16)
    cfg = compose_config(["ingest=table", f"ingest.path={table}"])
    reviews = ingest.ingest(cfg.ingest)
    counts = sorted(textmodel.count(chunks.with_texts(split.split(reviews.frame, cfg.split, cfg.seed),
                                                      reviews.table).train["text"]).values(), reverse=True)
    cut = 2 + next(k for k in range(8, len(counts)) if counts[k - 1] == counts[k])  # a tie at the vocabulary's cut
    for truncate, size, workers, local in (("pre", cut, 2, 1 << 16), ("post", cut, 0, 40), ("pre", 70000, 0, 1 << 16)):
        monkeypatch.setattr(chunks, "LOCAL", local)  # 40: most chunks' tokens need 4-byte codes
        cfg = compose_config(["ingest=table", f"ingest.path={table}", "build.sequence_length=40",
                              f"build.truncate={truncate}", f"build.vocabulary_size={size}"])
        reviews = ingest.ingest(cfg.ingest)
        parts = split.split(reviews.frame, cfg.split, cfg.seed)
        whole = build.vectorize(chunks.with_texts(parts, reviews.table), cfg.build)
        vocabulary, arrays = chunks.vectorize_table(parts, reviews.table, cfg.build, workers=workers)
        assert vocabulary == whole.vocabulary
        for got, expected in zip(arrays, (whole.x_train, whole.x_validation, whole.x_test)):
            assert got.dtype == expected.dtype == np.uint16 and np.array_equal(got, expected)
        kept = np.concatenate([whole.x_train, whole.x_validation, whole.x_test])
        assert (kept[:, -1] > 0).any() and (kept == 0).all(axis=1).any()  # some cut at 40 tokens, some of none
        assert (kept == 1).any() and len(vocabulary) == min(size, len(counts) + 2)  # tokens outside it, or none


def _fixes(message: str) -> list[list[str]]:
    """The overrides a message offers, one list per alternative (after "e.g." or "add", split at "or")."""
    offered = re.split(r"e\.g\.|add", message, maxsplit=1)[1]
    return [re.findall(r"split\.\w+=[\w.]+", part) for part in re.split(r",? or ", offered)]


@pytest.mark.parametrize("tried", [[], ["split=tutorial"], ["split.validation_size=5000"],
                                   ["split=tutorial", "split.validation_fraction=0.4"],
                                   ["split.validation_fraction=0.0001"], ["split.validation_fraction=1.5"],
                                   ["split=tutorial", "split.validation_size=null"]])
def test_a_table_splits_by_default_and_every_fix_a_split_error_offers_works_as_written(tmp_path, tried, monkeypatch,
                                                                                      capsys):
    """The README's command on a table of 1,000 reviews holds out 40% of its 500 training reviews; a
    setting that cannot work names a fix, and each fix offered, added to the command, works."""
    rng = random.Random(0)
    pd.DataFrame({"review": [review(rng, i % 2 == 0) for i in range(1000)],
                  "sentiment": ["positive" if i % 2 == 0 else "negative" for i in range(1000)]}).to_csv(
        tmp_path / "IMDB_Dataset.csv", index=False)
    command = ["ingest=table", f"ingest.path={tmp_path / 'IMDB_Dataset.csv'}", "ingest.text_column=review",
               "ingest.label_column=sentiment", "ingest.positive_label=positive"]
    reviews = ingest.ingest(compose_config(command).ingest)

    def sizes(overrides):
        cfg = compose_config(overrides)
        return split.split(reviews.frame, cfg.split, cfg.seed).sizes()

    if not tried:
        assert sizes(command) == {"train": 300, "validation": 200, "test": 500}
        vectorized_in_chunks(tmp_path / "IMDB_Dataset.csv", command, reviews, monkeypatch, capsys)
        return
    def follow(overrides, steps=3):  # each fix offered, added to the command, works or offers fixes that do
        try:
            parts = sizes(overrides)
        except ValueError as error:
            fixes = _fixes(str(error))
            assert steps and fixes and all(fixes), str(error)
            return [found for fix in fixes for found in follow(overrides + fix, steps - 1)]
        assert parts["train"] > 0 and parts["validation"] > 0, (overrides, parts)
        return [overrides]

    with pytest.raises(ValueError):
        sizes(command + tried)
    assert follow(command + tried)


# -- build --------------------------------------------------------------------------------------------
def test_standardize_drops_line_breaks_and_punctuation():
    index = textmodel.token_index(["", "[UNK]", "great", "film", "br"])
    ids = textmodel.encode(index, ["Great<br /><br />FILM!!", "film, great.", "Café<br>"], 4, "pre")
    assert ids.tolist() == [[2, 3, 0, 0], [3, 2, 0, 0], [1, 0, 0, 0]]  # no "br" token, padding at the end
    assert textmodel.tokens("It's <BR/>a 10/10 — film") == [b"its", b"a", b"1010", "—".encode(), b"film"]


def test_truncation_keeps_the_chosen_end():
    index = textmodel.token_index(["", "[UNK]", "a", "b", "c", "d"])
    assert textmodel.encode(index, ["a b c d"], 2, "pre").tolist() == [[4, 5]]
    assert textmodel.encode(index, ["a b c d"], 2, "post").tolist() == [[2, 3]]
    assert textmodel.encode(index, ["  a  b ", "x"], 3, "pre").tolist() == [[2, 3, 0], [1, 0, 0]]
    assert textmodel.encode(index, [], 3, "pre").shape == (0, 3)


def test_encoding_in_chunks_gives_the_same_ids(monkeypatch):
    index = textmodel.token_index(["", "[UNK]", "a", "b", "c"])
    texts = ["a b c", "c", "", "b b a x", "a"]
    whole = textmodel.encode(index, texts, 3, "pre")
    monkeypatch.setattr(textmodel, "ENCODE_CHUNK", 2)  # chunks of 2, 2 and 1 reviews
    assert textmodel.encode(index, texts, 3, "pre").tolist() == whole.tolist() == [
        [2, 3, 4], [4, 0, 0], [0, 0, 0], [3, 2, 1], [2, 0, 0]]


def test_vocabulary_ranks_tokens_by_training_count():
    vocabulary = textmodel.adapt(["b a c", "a c!", "A"], vocabulary_size=4)
    assert vocabulary == ["", "[UNK]", "a", "c"]  # a: 3, c: 2, b: 1 (cut)
    assert textmodel.adapt(["y x", "z"], vocabulary_size=10) == ["", "[UNK]", "z", "y", "x"]  # ties as Keras breaks them


def test_vocabulary_is_adapted_on_training_reviews_only(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    parts = split.split(reviews.frame, SplitConfig(validation_size=8), seed=1)
    parts.test.loc[:, "text"] = "zzzonlyintest " * 5
    parts.validation.loc[:, "text"] = "yyyonlyinvalidation " * 5
    encoded = build.vectorize(parts, BuildConfig(vocabulary_size=500, sequence_length=16))
    assert "zzzonlyintest" not in encoded.vocabulary and "yyyonlyinvalidation" not in encoded.vocabulary
    assert (encoded.x_test[:, :5] == 1).all()  # out of vocabulary
    assert encoded.x_train.shape == (16, 16) and encoded.x_train.dtype == np.uint16  # compact: the vocabulary fits
    assert encoded.y_train.tolist() == parts.train["label"].tolist()


def test_model_is_the_tutorials_architecture():
    model = build.build_model(BuildConfig(), vocabulary_size=10000)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Embedding", "GlobalAveragePooling1D", "Dense", "Dense"]
    assert model.get_layer("embedding").get_weights()[0].shape == (10000, 16)
    assert model.get_layer("hidden_1").units == 16 and model.get_layer("positive").units == 1
    assert model.count_params() == 10000 * 16 + 16 * 16 + 16 + 16 + 1
    deeper = build.build_model(BuildConfig(hidden_units=32, hidden_layers=2, dropout_rate=0.2), 100)
    assert [l.name for l in deeper.layers if l.name.startswith("hidden")] == ["hidden_1", "hidden_2"]
    assert sum(type(l).__name__ == "Dropout" for l in deeper.layers) == 3


def _ngram_ids_by_hand(texts, vocabulary, codes, ngrams, base):
    """The distinct known n-grams of each text as sets of ids, the slow and obvious way."""
    index = textmodel.token_index(vocabulary)
    lookup = {int(code): number + 1 for number, code in enumerate(codes)}
    rows = []
    for text in texts:
        ids = [index.get(token, 1) for token in textmodel.tokens(text)]
        found = set()
        for n in range(1, ngrams + 1):
            for start in range(len(ids) - n + 1):
                code = 0
                for word in ids[start:start + n]:
                    code = code * base + word
                found.add(lookup.get(code, 0))
        rows.append(found - {0})
    return rows


def test_ngrams_are_counted_in_training_reviews_and_encoded_as_distinct_ids():
    train = ["good film good film", "good film", "bad film", "bad bad film", "film"]
    vocabulary, codes = textmodel.adapt_ngrams(train, ngrams=2, min_count=2, size=100)
    index = textmodel.token_index(vocabulary)
    names = [" ".join(vocabulary[word] for word in _digits(int(code), len(vocabulary))) for code in codes]
    assert names == ["film", "good", "bad", "good film", "bad film"]  # by reviews holding them; ties: smaller code
    texts = ["good film, a bad film", "unheard of film", "film film film"]
    x = textmodel.encode_ngrams(index, pd.Index(codes), texts, 2, len(vocabulary), sequence_length=6)
    assert x.dtype == np.int32 and x.shape == (3, 6)
    assert [set(row[row > 0]) for row in x] == _ngram_ids_by_hand(texts, vocabulary, codes, 2, len(vocabulary))
    assert x[0].tolist() == [1, 2, 3, 4, 5, 0] and x[2].tolist() == [1, 0, 0, 0, 0, 0]  # ascending ids, 0-padded
    short = textmodel.encode_ngrams(index, pd.Index(codes), texts[:1], 2, len(vocabulary), sequence_length=2)
    assert short.tolist() == [[1, 2]]  # too many: the most frequent kept


def _digits(code: int, base: int) -> list[int]:
    digits = []
    while code:
        code, digit = divmod(code, base)
        digits.insert(0, digit)
    return digits


def test_bag_families_vectorize_on_the_training_part_only(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    reviews.frame.loc[reviews.frame["split"] == "test", "text"] += " zzzonlyintest zzzonlyintest"
    parts = split.split(reviews.frame, SplitConfig(validation_size=8), seed=1)
    encoded = build.vectorize(parts, BuildConfig(family="nbsvm", ngrams=3, min_count=1, sequence_length=300))
    assert encoded.ngrams == 3 and encoded.input_size == len(encoded.codes) + 1
    assert "zzzonlyintest" not in encoded.vocabulary
    texts = parts.test["text"].tolist()[:5]
    expected = _ngram_ids_by_hand(texts, encoded.vocabulary, encoded.codes, 3, len(encoded.vocabulary))
    assert [set(row[row > 0]) for row in encoded.x_test[:5]] == expected


def test_nbsvm_weights_each_ngram_by_its_training_log_count_ratio():
    x_train = np.array([[1, 2, 0], [1, 0, 0], [3, 0, 0]], dtype=np.int32)  # ids 1, 2 in positives; 3 in a negative
    y_train = np.array([1, 1, 0], dtype=np.float32)
    ratios = build.nb_ratios(x_train, y_train, size=5, smoothing=1.0)
    positive, negative = np.array([3, 2, 1, 1.0]), np.array([1, 1, 2, 1.0])  # ids 1-4, counts + 1; no padding
    expected = np.log((positive / positive.sum()) / (negative / negative.sum()))
    assert ratios[0] == 0 and ratios[1:] == pytest.approx(expected, abs=1e-6)
    model = build.build_model(BuildConfig(family="nbsvm"), 5, 3, train=(x_train, y_train))
    assert not model.get_layer("nb_ratios").trainable
    assert model.get_layer("nb_ratios").get_weights()[0].reshape(-1) == pytest.approx(ratios)
    with pytest.raises(ValueError, match="training arrays"):
        build.build_model(BuildConfig(family="nbsvm"), 5, 3)


def test_each_family_builds_its_published_architecture():
    kinds = {family: [type(layer).__name__ for layer in build.build_model(
        BuildConfig(family=family), 300, 64, train=(np.ones((2, 64), np.int32), np.array([0.0, 1.0]))).layers]
        for family in ("fasttext", "cnn", "nbsvm")}
    assert kinds["fasttext"] == ["InputLayer", "Embedding", "GlobalAveragePooling1D", "Dense"]
    assert kinds["cnn"] == ["InputLayer", "Embedding", "Dropout", "Conv1D", "Conv1D", "GlobalMaxPooling1D", "Dense",
                            "Dropout", "Dense"]
    assert kinds["nbsvm"] == ["InputLayer", "Embedding", "Embedding", "Dot", "Flatten", "Dense"]


# -- fit and evaluate ---------------------------------------------------------------------------------
@pytest.fixture
def encoded(tiny_archive):
    reviews = ingest.ingest(IngestConfig(path=str(tiny_archive)))
    parts = split.split(reviews.frame, SplitConfig(validation_size=8), seed=1)
    return build.vectorize(parts, BuildConfig(vocabulary_size=200, sequence_length=32))


def test_fit_records_one_row_per_epoch_and_calls_callbacks(encoded):
    import keras

    seen = []

    class Spy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((epoch, sorted(logs)))

    model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32), 200)
    fitted = fit.fit(model, encoded, FitConfig(epochs=3, batch_size=8, jit_compile=False), seed=1, callbacks=[Spy()])
    assert fitted.history["epoch"].tolist() == [1, 2, 3]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(fitted.history.columns)
    assert [epoch for epoch, _ in seen] == [0, 1, 2]
    assert fitted.stopped_epoch is None and fitted.best_epoch is None


def _fit_twice(encoded, first: dict, second: dict, learning_rate: float = 0.02, epochs: int = 4, size: int = 200):
    """(history, weights) of the same model trained with FitConfig(**first) and FitConfig(**second), in
    one batch an epoch (larger than the data, so the loop's padding rows are there and count for nothing)."""
    results = []
    for settings in (first, second):
        model = build.build_model(BuildConfig(vocabulary_size=size, sequence_length=32, learning_rate=learning_rate),
                                  size, seed=3)
        cfg = FitConfig(epochs=epochs, batch_size=len(encoded.x_train) + 5, **settings)
        results.append((fit.fit(model, encoded, cfg, seed=3).history, model.get_weights()))
    return results


@pytest.mark.parametrize("jit_compile", [False, True])
def test_the_compiled_epoch_loop_trains_as_keras_fit_does(encoded, jit_compile):
    """With one batch per epoch the order of the rows does not matter, so fit.loop=epoch (given Keras's
    sparse embedding gradient, fit.dense_gradients=false) and Keras's own model.fit must give the same
    curves and weights."""
    (history, weights), (keras_history, keras_weights) = _fit_twice(
        encoded, dict(loop="epoch", jit_compile=jit_compile, dense_gradients=False), dict(loop="keras", jit_compile=False))
    pd.testing.assert_frame_equal(history, keras_history[history.columns], rtol=1e-5)
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]  # it did train
    for ours, theirs in zip(weights, keras_weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_dense_gradients_change_nothing_where_no_token_repeats_within_a_batch(encoded):
    """fit.dense_gradients sums an embedding's gradient per row before the optimizer. Where every token
    of a batch is a different one there is nothing to sum: both settings give the same curves and weights."""
    unique = np.arange(2, 2 + encoded.x_train.size, dtype=np.int32).reshape(encoded.x_train.shape)  # each id once
    data = build.Encoded(encoded.vocabulary, unique, encoded.y_train, encoded.x_validation, encoded.y_validation,
                         encoded.x_test, encoded.y_test)
    (dense, dense_weights), (sparse, sparse_weights) = _fit_twice(
        data, dict(dense_gradients=True), dict(dense_gradients=False), size=unique.size + 2)
    pd.testing.assert_frame_equal(dense, sparse, rtol=1e-5)
    for ours, theirs in zip(dense_weights, sparse_weights):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_dense_gradients_give_adam_the_summed_gradient_of_a_repeated_token(encoded):
    """Adam's first step moves each weight by the learning rate (m/sqrt(v) = g/|g|) when it sees the
    token's summed gradient g. Keras 3's sparse path adds the square of each occurrence into v instead,
    so a token repeated within the batch moves by another amount: the switch is what it says."""
    import keras

    assert (np.bincount(encoded.x_train.ravel()) > 1).any()  # tokens repeat in this batch
    moved = {}
    for dense in (True, False):
        model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32), 200, seed=3)
        model.compile(optimizer=keras.optimizers.Adam(0.001, epsilon=1e-12), loss="binary_crossentropy",
                      metrics=["accuracy"])  # an epsilon too small to blur the step
        before = model.get_layer("embedding").get_weights()[0]
        fit.fit(model, encoded, FitConfig(epochs=1, batch_size=len(encoded.x_train) + 5, dense_gradients=dense), seed=3)
        step = np.abs(model.get_layer("embedding").get_weights()[0] - before)
        moved[dense] = step[np.unique(encoded.x_train)]  # the rows the batch touched
    touched = moved[True] > 1e-6
    np.testing.assert_allclose(moved[True][touched], 0.001, rtol=1e-3)
    off = np.abs(moved[False][touched] / 0.001 - 1) > 0.05
    assert off.mean() > 0.5  # (94% here: the median moved 1.4 times the learning rate)


@pytest.mark.parametrize("loop", ["epoch", "keras"])
def test_dropout_draws_a_new_mask_at_every_training_step(encoded, loop):
    """Inside the compiled epoch, each Dropout layer's random state must move on at every step (and not
    in validation), as in model.fit: otherwise every batch of an epoch would drop the same units."""
    model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32, dropout_rate=0.5), 200, seed=3)
    generators = [layer.seed_generator for layer in model.layers if type(layer).__name__ == "Dropout"]
    before = [np.array(generator.state.numpy()) for generator in generators]
    fit.fit(model, encoded, FitConfig(epochs=2, batch_size=8, loop=loop, jit_compile=loop == "epoch"), seed=3)
    steps = 2 * -(-len(encoded.x_train) // 8)
    assert len(generators) == 2
    for generator, start in zip(generators, before):
        assert (np.array(generator.state.numpy()) - start).tolist() == [0, steps]


def test_early_stopping_records_stopped_and_best_epochs(encoded):
    cfg = FitConfig(epochs=60, batch_size=8, jit_compile=False)
    cfg.early_stopping.enabled = True
    cfg.early_stopping.patience = 2
    model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32, learning_rate=0.05), 200)
    fitted = fit.fit(model, encoded, cfg, seed=1)
    assert fitted.stopped_epoch == len(fitted.history) < 60
    assert fitted.best_epoch == fitted.stopped_epoch - 2
    assert fitted.history.loc[fitted.best_epoch - 1, "val_loss"] == fitted.history["val_loss"].min()


def test_same_seed_same_history(encoded):
    def history():
        model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32), 200, seed=7)
        return fit.fit(model, encoded, FitConfig(epochs=2, batch_size=8, jit_compile=False), seed=7).history

    pd.testing.assert_frame_equal(history(), history())


def test_evaluate_scores_the_test_split(encoded):
    model = build.build_model(BuildConfig(vocabulary_size=200, sequence_length=32, learning_rate=0.02), 200)
    fitted = fit.fit(model, encoded, FitConfig(epochs=15, batch_size=8, jit_compile=False), seed=1)
    result = evaluate.evaluate(model, encoded, fitted.history, EvaluateConfig())
    assert set(result.metrics) == {"test_loss", "test_accuracy", "test_precision", "test_recall", "test_f1_score",
                                   "test_roc_auc", "test_true_negatives", "test_false_positives",
                                   "test_false_negatives", "test_true_positives"}
    assert sum(result.metrics[f"test_{n}"] for n in ("true_negatives", "false_positives", "false_negatives",
                                                      "true_positives")) == 24
    assert result.metrics["test_accuracy"] >= 0.75  # the tiny reviews carry obvious sentiment words
    assert result.probabilities.shape == (24,)
    loss, accuracy = model.evaluate(encoded.x_test, encoded.y_test, verbose=0)  # Keras's own numbers
    assert result.metrics["test_loss"] == pytest.approx(loss, abs=1e-5)
    assert result.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert set(result.figures) == {"loss.png", "accuracy.png", "roc_curve.png", "precision_recall_curve.png",
                                   "confusion_matrix.png"}
    loss_axes = result.figures["loss.png"].axes[0]
    assert [line.get_label() for line in loss_axes.lines][:2] == ["Training loss", "Validation loss"]
    assert len(loss_axes.lines[0].get_xdata()) == 15
    # scored in big calls (evaluate.batch_size rows), the same bits as a training batch at a time, here and for a
    # masked bag of n-grams; the rows end neither size's last call on a whole call
    rows = EvaluateConfig().batch_size + 3 * FitConfig().batch_size + 45
    x = np.random.default_rng(3).integers(0, 200, (rows, 32)).astype(np.uint16)
    for scored in (model, build.build_model(BuildConfig(family="fasttext", ngrams=2, sequence_length=32), 200)):
        big, small = (evaluate.predict(scored, x, size) for size in (EvaluateConfig().batch_size, FitConfig().batch_size))
        assert big.shape == (rows,) and np.array_equal(big, small)


# -- the model comparison's ranking ---------------------------------------------------------------------
def test_the_comparison_chooses_by_validation_accuracy_never_by_test_accuracy():
    from pipeline import analysis

    rows, histories = [], {}
    # "steady" validates better; "lucky" scores better on the test split: the choice must be "steady"
    for family, val_accuracy, test_accuracy in (("steady", 0.92, 0.90), ("lucky", 0.90, 0.93), ("tutorial", 0.88, 0.87)):
        for seed in (1, 2, 3):
            run_id = f"{family}-{seed}"
            histories[run_id] = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.5, 0.3, 0.2], "accuracy": [0.8, 0.9, 0.95],
                                              "val_loss": [0.4, 0.3, 0.35],
                                              "val_accuracy": [0.85, val_accuracy + seed / 1000, 0.86]})
            rows.append(analysis.job_row(f"build={family},seed={seed}", run_id, {"build": family, "seed": seed, "fit.epochs": 3},
                                         histories[run_id], test_accuracy + seed / 1000, family=family,
                                         fit_seconds=2.0 * seed, parameters=100, model_size_mb=1.5))
    result = analysis.analyze({"build": "steady,lucky,tutorial", "seed": "1,2,3"}, rows, histories,
                              failed=[{"job": "build=cnn,seed=1", "run_id": "x", "error": "boom"}])
    assert result.ranking["family"].tolist() == ["steady", "lucky", "tutorial"]
    assert result.best_run == "steady-3"  # the chosen family's run of the highest validation accuracy
    steady = result.ranking.iloc[0]
    assert steady.test_accuracy_mean == pytest.approx(0.902) and steady.fit_seconds == pytest.approx(4.0)
    assert steady.test_accuracy_std == pytest.approx(np.std([0.901, 0.902, 0.903]))
    assert steady.min_val_loss_epoch == 2 and steady.runs == 3
    assert "**Best family: steady**" in result.report and "+3.00 points of test accuracy" in result.report
    assert "it overfits after epoch 2" in result.report and "boom" in result.report
    assert set(result.figures) == {"test_accuracy_by_training_seconds.png", "val_loss_by_family.png"}
    assert result.headline["best_family.last_epoch_model.test_accuracy_mean"] == pytest.approx(0.902)
    from matplotlib import pyplot as plt

    for figure in result.figures.values():
        plt.close(figure)
