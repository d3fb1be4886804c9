"""Rank 0's per-epoch metrics as TensorBoard event files in the run directory (local or object store)."""

from __future__ import annotations

import tempfile

import pyarrow.fs as pafs

from skinray.data.catalog import resolve


class TensorBoard:
    """Rank 0's TensorBoard event files, written locally and copied to `run/tensorboard` each epoch
    (the run directory may be in an object store, which TensorFlow cannot append to)."""

    def __init__(self, run_uri: str):
        import tensorflow as tf

        self.local = tempfile.mkdtemp(prefix="skinray-tb-")
        self.writer = tf.summary.create_file_writer(self.local)
        self.fs, path, _ = resolve(run_uri)
        self.remote = f"{path}/tensorboard"

    def write(self, metrics: dict) -> None:
        import tensorflow as tf

        with self.writer.as_default(step=metrics["epoch"]):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tf.summary.scalar(key, value)
        self.writer.flush()
        self.fs.create_dir(self.remote, recursive=True)
        pafs.copy_files(self.local, self.remote, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def close(self) -> None:
        self.writer.close()
