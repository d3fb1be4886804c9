"""`skinray monitor`: answers logged by the prediction log's writer (or bulk scoring) against the
bundle's validation answers; a planted shift is flagged, answers like the validation ones are not."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from skinray import UserError
from skinray.cli import main
from skinray.config import MonitorConfig
from skinray.monitor import monitor, parse_since, psi

SMALL_GROUPS = ["--min-rows", "20"]


def answers(bundle, paths):
    """The bundle's answers to image files, as the endpoint gives them, and each file's bytes."""
    import numpy as np

    from skinray.data.ingest import decode_views
    from skinray.predictor import Predictor

    predictor = Predictor.from_path(str(bundle))
    data = [p.read_bytes() for p in paths]
    views = [decode_views(d, predictor.sizes, 25_000_000) for d in data]
    stacked = {s: np.stack([v[s] for v in views]) for s in predictor.sizes}
    found = predictor.predict(stacked).answers(predictor.classes, 3)
    return predictor.version, found, data


def write_log(folder, version, found, data, day=None, rows_per_file=16):
    """The rows through the endpoint's own writer (several files), dated `day` when given."""
    from skinray.serve.prediction_log import PredictionLog, rows_of

    log = PredictionLog(str(folder), rows_per_file, 60, 1.0, False)
    rows = rows_of(found, version, "/v1/predict", "test", 12.5, [(len(d), d) for d in data])
    if day is not None:
        rows = [{**r, "time": day} for r in rows]
    log.add(rows)
    log.close()


@pytest.fixture(scope="module")
def logged(bundle, members, tmp_path_factory):
    """Two logs of the demo bundle's answers: its archive's test photos (like its validation
    images), and a planted shift (one class's photos, and scanned digits that are not skin)."""
    from skinray.demo import scanned_digit

    test = sorted((members["archive"] / "test").rglob("*.jpg"))
    one_class = sorted(test[0].parent.glob("*.jpg"))
    digits = tmp_path_factory.mktemp("digits")
    for i in range(8):
        (digits / f"{i}.png").write_bytes(scanned_digit(i))
    root = tmp_path_factory.mktemp("logs")
    version, found, data = answers(bundle, test)
    write_log(root / "like", version, found, data)
    _, shifted, shifted_data = answers(bundle, one_class * 2 + sorted(digits.glob("*.png")))
    write_log(root / "shifted", version, shifted, shifted_data)
    return {"like": root / "like", "shifted": root / "shifted", "version": version, "test": len(test)}


def test_answers_like_the_validation_ones_are_not_flagged(logged, bundle, tmp_path):
    args = ["monitor", "--logs", str(logged["like"]), "--model", str(bundle), "--out", str(tmp_path)]
    code = main(args + SMALL_GROUPS)
    report = json.loads((tmp_path / "report.json").read_text())
    ((group,),) = [v["groups"] for v in report["versions"]]
    assert group["rows"] == logged["test"] and report["rows"] == logged["test"]
    assert code == 0 and not report["drift"] and group["judged"] and group["psi"] < 0.25
    plot = tmp_path / report["versions"][0]["plot"]
    assert plot.stat().st_size > 0 and "No drift" in (tmp_path / "report.md").read_text()


def test_a_planted_shift_is_flagged_and_exits_1(logged, bundle, tmp_path):
    code = main(
        ["monitor", "--logs", str(logged["shifted"]), "--model", str(bundle), "--out", str(tmp_path)]
        + SMALL_GROUPS
    )
    report = json.loads((tmp_path / "report.json").read_text())
    ((group,),) = [v["groups"] for v in report["versions"]]
    assert code == 1 and report["drift"]
    assert any("predicted classes shifted" in f for f in group["flags"]), group
    assert any("out-of-distribution rate moved" in f for f in group["flags"]), group
    assert "Drift: 1 group(s) flagged" in (tmp_path / "report.md").read_text()


def test_groups_by_day_and_version_and_since(logged, bundle, tmp_path):
    """Two days of logs, rows of a second bundle (the first, resealed: another version) and of a
    version not asked about: a group per day and bundle, the other version counted."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from skinray.bundle import seal
    from skinray.serve.prediction_log import SCHEMA

    second = tmp_path / "second"
    shutil.copytree(bundle, second)
    manifest = json.loads((second / "bundle.json").read_text())
    v2 = seal(second, {**manifest, "created": "2026-12-01T00:00:00Z"})["version"]
    rows = duckdb.sql(f"select * from read_parquet('{logged['like']}/**/*.parquet')").df()
    today = datetime.now(UTC).replace(microsecond=0)
    yesterday = today - timedelta(days=1)
    logs = tmp_path / "logs"

    def write(frame, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(frame, SCHEMA, preserve_index=False), path)

    write(rows.assign(time=yesterday), logs / f"date={yesterday:%Y-%m-%d}" / "a.parquet")
    write(rows.assign(time=today), logs / f"date={today:%Y-%m-%d}" / "b.parquet")
    write(rows.assign(time=today, model_version=v2), logs / f"date={today:%Y-%m-%d}" / "c.parquet")
    write(rows.assign(time=today, model_version="another-version"), logs / "other.parquet")

    report = monitor(str(logs), [str(bundle), str(second)], tmp_path / "out", MonitorConfig(min_rows=20))
    first, other = report["versions"]
    assert [g["day"] for g in first["groups"]] == ["all days", f"{yesterday:%Y-%m-%d}", f"{today:%Y-%m-%d}"]
    assert [g["rows"] for g in first["groups"]] == [2 * len(rows), len(rows), len(rows)]
    assert other["model_version"] == v2 and [g["rows"] for g in other["groups"]] == [len(rows)]
    assert report["other_versions"] == {"another-version": len(rows)}
    recent = monitor(str(logs), [str(bundle)], tmp_path / "recent", MonitorConfig(), since="12h")
    assert [g["rows"] for g in recent["versions"][0]["groups"]] == [len(rows)]


def test_psi_and_since():
    import numpy as np

    assert psi(np.array([50, 50]), np.array([50, 50])) == 0 < psi(np.array([90, 10]), np.array([50, 50]))
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert parse_since("2026-11-30", now) == datetime(2026, 11, 30, tzinfo=UTC)
    with pytest.raises(UserError, match="7d, 24h"):
        parse_since("last week", now)


def test_a_change_is_flagged_only_when_chance_cannot_explain_it():
    """6 of 36 referred against 0 of 24 validation images could be chance (p 0.07): not flagged;
    20 of 40 cannot. The same for refusals against the target rate, and for classes."""
    import pandas as pd

    from skinray.monitor import compare

    reference = {"images": 24, "labels": {"a": 12, "b": 12}, "confidence": [0.9] * 24, "abstained": 0.0}
    reference["out_of_distribution"] = 0.05
    cfg = MonitorConfig(min_rows=20)

    def rows(n, abstained, refused, a):
        return pd.DataFrame(
            {
                "label": ["a"] * a + ["b"] * (n - a),
                "confidence": [0.9] * n,
                "abstained": [True] * abstained + [False] * (n - abstained),
                "out_of_distribution": [True] * refused + [False] * (n - refused),
            }
        )

    assert compare(rows(36, 6, 4, 18), reference, ["a", "b"], cfg)["flags"] == []
    flags = compare(rows(40, 20, 20, 38), reference, ["a", "b"], cfg)["flags"]
    assert [f.split(" (")[0] for f in flags] == [
        "predicted classes shifted",
        "abstention rate moved +50.0%",
        "out-of-distribution rate moved +45.0%",
    ]


def test_a_model_without_validation_answers_is_refused(members, logged, tmp_path):
    with pytest.raises(UserError, match="no validation answers"):
        monitor(str(logged["like"]), [members["runs"][0]], tmp_path, MonitorConfig())
