import numpy as np
import pyarrow as pa
import pytest
from corpus import CASES

from skinray.config import AugmentConfig
from skinray.data.catalog import list_archive
from skinray.data.ingest import (
    FailureLog,
    ImageSource,
    epochs_of_rows,
    iter_stream,
    shard,
    steps_per_epoch,
    stream,
)


@pytest.fixture(scope="module")
def catalog(sample_archive):
    return list_archive(str(sample_archive))


def test_training_shards_are_equal_disjoint_and_reshuffled(catalog):
    table = catalog.split("train")  # 96 rows
    shards = [shard(table, rank=r, world=3, batch_size=5, seed=1, epoch=0, train=True) for r in range(3)]
    assert [s.num_rows for s in shards] == [30, 30, 30]  # 6 full steps of 5 for each worker
    assert steps_per_epoch(96, 3, 5) == 6
    paths = [p for s in shards for p in s["path"].to_pylist()]
    assert len(set(paths)) == 90
    again = shard(table, rank=0, world=3, batch_size=5, seed=1, epoch=0, train=True)
    later = shard(table, rank=0, world=3, batch_size=5, seed=1, epoch=1, train=True)
    assert again["path"].to_pylist() == shards[0]["path"].to_pylist()
    assert later["path"].to_pylist() != shards[0]["path"].to_pylist()


def test_evaluation_shards_cover_every_row_once(catalog):
    table = catalog.split("test")
    shards = [shard(table, rank=r, world=5, batch_size=4, seed=0, epoch=0, train=False) for r in range(5)]
    assert sorted(p for s in shards for p in s["path"].to_pylist()) == sorted(table["path"].to_pylist())


def test_a_multi_epoch_stream_keeps_its_epochs_in_order(ray_cluster, catalog):
    table = epochs_of_rows(catalog.split("train"), rank=1, world=2, batch_size=8, seed=0, epochs=range(2, 5))
    assert table["epoch"].to_pylist() == [2] * 48 + [3] * 48 + [4] * 48
    batches = list(
        iter_stream(
            stream(table, source=ImageSource.of(catalog), size=64, batch_size=8, augment=AugmentConfig()), 8
        )
    )
    assert len(batches) == 3 * steps_per_epoch(96, 2, 8)
    assert [b["path"].tolist() for b in batches] == [
        table["path"].to_pylist()[i : i + 8] for i in range(0, table.num_rows, 8)
    ]
    for batch in batches:
        assert batch["image"].shape == (8, 64, 64, 3) and batch["image"].dtype == np.uint8
        assert batch["ok"].all()
        for path, index in zip(batch["path"], batch["label_index"]):
            assert f"/{catalog.classes[index]}/" in path


def test_augmentation_is_reproducible_per_epoch_through_ray(ray_cluster, catalog):
    table = catalog.split("test").slice(0, 4)
    source = ImageSource.of(catalog)

    def images(epoch):
        rows = table.append_column("epoch", pa.array([epoch] * 4, pa.int32()))
        batches = iter_stream(stream(rows, source=source, size=48, batch_size=4, augment=AugmentConfig()), 4)
        return {p: img for b in batches for p, img in zip(b["path"], b["image"])}

    first, again, other = images(0), images(0), images(1)
    for path in first:
        assert np.array_equal(first[path], again[path])
        assert not np.array_equal(first[path], other[path])


def test_bad_files_are_recorded_not_dropped_and_never_crash(ray_cluster, awkward_files):
    catalog = list_archive(str(next(iter(awkward_files.values())).parents[2]))
    failures = FailureLog()
    rows = 0
    for batch in iter_stream(stream(catalog.table, source=ImageSource.of(catalog), size=32, batch_size=3), 3):
        assert batch["image"].shape[1:] == (32, 32, 3)
        rows += len(batch["path"])
        failures.add(batch)
    assert rows == len(CASES)
    bad = {name for name, (_, _, expect) in CASES.items() if expect != "ok"}
    assert failures.count == len(bad)
    for case in bad:
        path = str(awkward_files[case])
        assert CASES[case][2] in failures.files[path]
    assert failures.summary().startswith(f"{len(bad)} files failed")


def test_a_vanished_file_is_a_recorded_failure(ray_cluster, tmp_path, catalog):
    table = pa.table(
        {"path": [str(tmp_path / "gone.jpg")], "label": ["x"], "label_index": pa.array([0], pa.int32())}
    )
    batch = next(iter(iter_stream(stream(table, source=ImageSource.of(catalog), size=32, batch_size=1), 1)))
    assert not batch["ok"][0] and "cannot read file" in batch["error"][0]
