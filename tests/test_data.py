import gzip
import json

import pandas as pd
import pytest

from tightrope.data import load_task
from tightrope.errors import TightropeError


def test_local_csv_with_string_labels(tiny_task):
    data = load_task(str(tiny_task))
    assert len(data) == 48
    assert data.label_names == ("negative", "positive")
    assert set(data.labels) == {0, 1}
    assert data.texts[0] == "a wonderful, moving film" and data.labels[0] == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".parquet", ".tsv"])
def test_other_formats_and_column_mapping(tmp_path, suffix):
    frame = pd.DataFrame({"review": ["good", "bad", "fine"], "stars": [2, 0, 1]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    else:
        text = "\n".join(json.dumps(r) for r in frame.to_dict("records"))
        path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    data = load_task(str(path), text_column="review", label_column="stars")
    assert data.texts == ["good", "bad", "fine"]
    assert data.labels == [2, 0, 1] and data.num_labels == 3


def test_seeded_subset_is_reproducible_and_differs_by_seed(tiny_task):
    a = load_task(str(tiny_task), n=10, seed=1)
    b = load_task(str(tiny_task), n=10, seed=1)
    c = load_task(str(tiny_task), n=10, seed=2)
    assert a.texts == b.texts and len(a) == 10
    assert (a.texts, a.labels) != (c.texts, c.labels)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"text": ["a", "b"], "label": [0.5, 1.0]}, "labels must be integers or strings"),
        ({"text": ["a", "  "], "label": [0, 1]}, "empty"),
        ({"body": ["a", "b"], "label": [0, 1]}, "no text column"),
        ({"text": ["a", "b"], "y": [0, 1]}, "no label column 'label'"),
        ({"text": ["a", "b"], "label": [-1, 1]}, "negative label"),
    ],
)
def test_bad_files_get_one_sentence(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(TightropeError, match=message):
        load_task(str(path))


def test_missing_path(tmp_path):
    with pytest.raises(TightropeError, match="does not exist"):
        load_task(str(tmp_path / "nope.csv"))


def test_named_task_not_found_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TightropeError) as err:
        load_task("imdb", "test")
    text = str(err.value)
    assert str(tmp_path) in text and "TIGHTROPE_DATA_DIR" in text


def test_unknown_split_of_named_task(data_dir):
    with pytest.raises(TightropeError, match="no split"):
        load_task("imdb", "validation", data_dir=data_dir)


def test_rotten_tomatoes_needs_no_download():
    train = load_task("rotten-tomatoes", "train")
    test = load_task("rotten-tomatoes", "test")
    assert train.label_names == ("rotten", "fresh")
    validation = load_task("rotten-tomatoes", "validation")
    everything = load_task("rotten-tomatoes", "all")
    assert len(train) + len(validation) + len(test) == len(everything) == 12808  # plot rows dropped
    assert sum(everything.labels) == 7403  # fresh = 1


def test_named_tasks_from_shared_data(data_dir):
    imdb = load_task("imdb", "test", data_dir=data_dir, n=50, seed=0)
    assert len(imdb) == 50 and imdb.label_names == ("negative", "positive")
    sst2 = load_task("sst2", "validation", data_dir=data_dir)
    assert len(sst2) == 872
    mr_train, mr_test = load_task("mr", "train", data_dir=data_dir), load_task("mr", "test", data_dir=data_dir)
    assert len(mr_train) + len(mr_test) == 10662 and len(mr_test) == 1066
    assert len(load_task("textfooler-imdb", "test", data_dir=data_dir)) == 1000
