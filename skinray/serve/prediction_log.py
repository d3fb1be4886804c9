"""The prediction log: one Parquet row per answered image, written off the request path.

    serve.prediction_log: PATH_OR_URI        (serve.prediction_log_sample: the share of requests)

Each ingress replica buffers its rows in memory and a thread of its own writes them, as a file per
`serve.prediction_log_rows` rows or `serve.prediction_log_minutes` minutes, whichever comes first:

    PATH/date=2026-12-01/101502-3f9a01c2-000007.parquet      (UTC; time, replica, sequence)

A request never waits on storage: it appends its rows and returns. A write that fails (the store
is down, the bucket gone) drops that file's rows, counts them in `skinray_prediction_log_rows
{outcome="dropped"}` and logs a warning; so do rows arriving while `BUFFER_FILES` files' worth wait
unwritten. Rows hold the answer, never the key or the request's headers; the image's bytes only
with `serve.prediction_log_images`. `skinray monitor` reads the folder (`skinray.monitor`).
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from skinray.storage import join_uri, redact, write_bytes

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("time", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("route", pa.string()),
        ("model_version", pa.string()),
        ("role", pa.string()),  # stable, canary, or shadow (scored a copy; never returned)
        ("label", pa.string()),
        ("confidence", pa.float32()),
        ("abstained", pa.bool_()),
        ("out_of_distribution", pa.bool_()),
        ("differential_size", pa.int32()),  # null: the bundle has no differential sets
        ("ood_score", pa.float32()),  # null: the bundle has no out-of-distribution check
        ("latency_ms", pa.float32()),
        ("input_bytes", pa.int64()),
        ("image", pa.binary()),  # null unless serve.prediction_log_images
    ]
)
BUFFER_FILES = 10  # rows waiting for storage beyond this many files' worth are dropped
WAKE_S = 1.0


class PredictionLog:
    def __init__(self, location: str, rows_per_file: int, minutes: float, sample: float, images: bool):
        from ray.serve import metrics

        self.location, self.rows_per_file, self.seconds = location, rows_per_file, minutes * 60
        self.sample, self.images = sample, images
        self.replica, self.sequence = uuid.uuid4().hex[:8], 0
        self.pending: list[dict] = []
        self.oldest = 0.0  # when the oldest pending row arrived (time.monotonic)
        self.lock, self.wake, self.closed = threading.Lock(), threading.Event(), False
        self.rows = metrics.Counter(
            "skinray_prediction_log_rows",
            "prediction log rows, by outcome (written, or dropped when storage failed or fell behind)",
            tag_keys=("outcome",),
        )
        self.writer = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self.writer.start()

    @classmethod
    def of(cls, cfg) -> PredictionLog | None:
        """The log `cfg` (a ServeConfig) asks for, or None."""
        if not cfg.prediction_log:
            return None
        return cls(
            cfg.prediction_log,
            cfg.prediction_log_rows,
            cfg.prediction_log_minutes,
            cfg.prediction_log_sample,
            cfg.prediction_log_images,
        )

    def sampled(self) -> bool:
        """Whether this request is logged (`serve.prediction_log_sample`)."""
        return self.sample >= 1.0 or random.random() < self.sample

    def add(self, rows: list[dict]) -> None:
        """Queues rows (SCHEMA's fields) for the writer; never blocks on storage."""
        if not self.images:
            rows = [{**row, "image": None} for row in rows]
        with self.lock:
            if not self.pending:
                self.oldest = time.monotonic()
            room = max(BUFFER_FILES * self.rows_per_file - len(self.pending), 0)
            self.pending.extend(rows[:room])
            full = len(self.pending) >= self.rows_per_file
        if len(rows) > room:
            self._dropped(len(rows) - room, "the rows waiting for storage fill the log's buffer")
        if full:
            self.wake.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Writes what is pending and stops the writer (a replica shutting down)."""
        self.closed = True
        self.wake.set()
        self.writer.join(timeout_s)

    # === The writer thread ===

    def _write_loop(self) -> None:
        while True:
            self.wake.wait(WAKE_S)
            self.wake.clear()
            closing = self.closed
            while batch := self._take(closing):
                self._write(batch)
            if closing:
                return

    def _take(self, everything: bool) -> list[dict]:
        """The next file's rows: a full file, or what waits once it is old enough (or at close)."""
        with self.lock:
            due = everything or time.monotonic() - self.oldest >= self.seconds
            if len(self.pending) < self.rows_per_file and not (self.pending and due):
                return []
            batch, self.pending = self.pending[: self.rows_per_file], self.pending[self.rows_per_file :]
            self.oldest = time.monotonic()
            return batch

    def _write(self, rows: list[dict]) -> None:
        first = rows[0]["time"]
        self.sequence += 1
        name = f"date={first:%Y-%m-%d}/{first:%H%M%S}-{self.replica}-{self.sequence:06d}.parquet"
        try:
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, SCHEMA), buffer, compression="zstd")
            write_bytes(join_uri(self.location, name), buffer.getvalue())
        except Exception as exc:  # any storage failure: the rows go, the requests never notice
            where = redact(join_uri(self.location, name))
            self._dropped(len(rows), f"writing {where} failed: {redact(str(exc))}")
            return
        self.rows.inc(len(rows), {"outcome": "written"})

    def _dropped(self, n: int, why: str) -> None:
        self.rows.inc(n, {"outcome": "dropped"})
        log.warning("prediction log: %d row(s) dropped: %s", n, why)


def rows_of(
    answers: list[dict],
    version: str,
    route: str,
    request_id: str,
    latency_ms: float,
    inputs: list[tuple[int, bytes | None]],
    role: str = "stable",
) -> list[dict]:
    """The log's rows of one request: an answer per image, with (its size in bytes, the encoded
    image or None for a tensor of pixels)."""
    now = datetime.now(UTC)
    return [
        {
            "time": now,
            "request_id": request_id,
            "route": route,
            "model_version": version,
            "role": role,
            "label": a["label"],
            "confidence": a["confidence"],
            "abstained": a["abstained"],
            "out_of_distribution": a["out_of_distribution"],
            "differential_size": None if a["differential"] is None else len(a["differential"]),
            "ood_score": a["ood_score"],
            "latency_ms": latency_ms,
            "input_bytes": size,
            "image": data,
        }
        for a, (size, data) in zip(answers, inputs)
    ]
