import numpy as np
import pytest
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

from skinray.data.catalog import ArchiveError, class_weights, list_archive, splits, train_val_split


def _touch_image(path, ext="jpg"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, "PNG" if ext.lower() == "png" else "JPEG")


def test_split_layout(sample_archive):
    catalog = list_archive(str(sample_archive))
    assert catalog.num_classes == 4
    assert catalog.classes == sorted(catalog.classes)
    assert catalog.split("train").num_rows == 96 and catalog.split("test").num_rows == 24
    assert catalog.table.column_names == ["path", "label", "label_index", "split"]
    row = catalog.table.slice(0, 1).to_pylist()[0]
    assert catalog.classes[row["label_index"]] == row["label"]


def test_flat_layout_recursive_mixed_case_and_skips(tmp_path):
    _touch_image(tmp_path / "Zeta" / "a.JPG")
    _touch_image(tmp_path / "Zeta" / "nested" / "deeper" / "b.Png", "png")
    _touch_image(tmp_path / "Alpha" / "c.jpeg")
    _touch_image(tmp_path / "Alpha" / ".hidden.jpg")
    _touch_image(tmp_path / ".git" / "x.jpg")
    (tmp_path / "Alpha" / "notes.txt").write_text("hi")
    _touch_image(tmp_path / "loose.jpg")
    catalog = list_archive(str(tmp_path))
    assert catalog.classes == ["Alpha", "Zeta"]
    assert catalog.split_names == ["train"]
    assert sorted(catalog.table["label"].to_pylist()) == ["Alpha", "Zeta", "Zeta"]
    assert catalog.skipped == {"hidden": 2, "not an image file name": 1, "not inside a class folder": 1}


def test_class_map_is_stable_across_splits(tmp_path):
    _touch_image(tmp_path / "train" / "b" / "1.jpg")
    _touch_image(tmp_path / "test" / "a" / "2.jpg")
    catalog = list_archive(str(tmp_path))
    assert catalog.classes == ["a", "b"]  # a class seen only in test still has its index


def test_file_uri_is_accepted(sample_archive):
    assert list_archive(f"file://{sample_archive}").table.num_rows == 120


def test_empty_or_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(ArchiveError, match="no images"):
        list_archive(str(tmp_path))
    with pytest.raises(ArchiveError, match="not a folder"):
        list_archive(str(tmp_path / "missing"))


def test_stratified_split_is_deterministic_disjoint_and_proportional(sample_archive):
    train = list_archive(str(sample_archive)).split("train")
    a_train, a_val = train_val_split(train, 0.25, seed=3)
    b_train, b_val = train_val_split(train, 0.25, seed=3)
    assert a_val["path"].to_pylist() == b_val["path"].to_pylist()
    assert not set(a_train["path"].to_pylist()) & set(a_val["path"].to_pylist())
    assert a_train.num_rows + a_val.num_rows == train.num_rows
    per_class = np.bincount(a_val["label_index"].to_numpy(), minlength=4)
    assert per_class.tolist() == [6, 6, 6, 6]
    _, other = train_val_split(train, 0.25, seed=4)
    assert other["path"].to_pylist() != a_val["path"].to_pylist()


def test_single_image_class_stays_in_training():
    import pyarrow as pa

    table = pa.table({"path": ["a", "b", "c", "d"], "label_index": pa.array([0, 0, 0, 1], pa.int32())})
    train, val = train_val_split(table, 0.5, seed=0)
    assert 1 in train["label_index"].to_pylist() and 1 not in val["label_index"].to_pylist()


def test_splits_use_the_archives_test_folder(sample_archive):
    parts = splits(list_archive(str(sample_archive)), 0.2, seed=0)
    assert set(parts) == {"train", "val", "test"}
    assert parts["test"].num_rows == 24
    assert parts["train"].num_rows + parts["val"].num_rows == 96


def test_class_weights_are_sklearns_balanced_weights():
    labels = np.array([0] * 30 + [1] * 10 + [3] * 5)
    ours = class_weights(labels, 4)
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels)
    assert ours[0] == pytest.approx(expected[0]) and ours[1] == pytest.approx(expected[1])
    assert ours[3] == pytest.approx(expected[2]) and ours[2] == 0.0
