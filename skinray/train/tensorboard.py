"""Rank 0's per-epoch metrics as TensorBoard event files in the run directory (local or object store)."""

from __future__ import annotations

import shutil
import tempfile

from skinray.storage import join_uri, upload_folder


class TensorBoard:
    """Rank 0's TensorBoard event files, written locally and copied to `run/tensorboard` each epoch
    (the run directory may be in an object store, which TensorFlow cannot append to)."""

    def __init__(self, run_uri: str):
        import tensorflow as tf

        self.local = tempfile.mkdtemp(prefix="skinray-tb-")
        self.writer = tf.summary.create_file_writer(self.local)
        self.remote = join_uri(run_uri, "tensorboard")

    def write(self, metrics: dict) -> None:
        import tensorflow as tf

        with self.writer.as_default(step=metrics["epoch"]):
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tf.summary.scalar(key, value)
        self.writer.flush()
        upload_folder(self.local, self.remote)

    def close(self) -> None:
        """Ends the run's event files; the local copy goes (everything is in the run directory)."""
        self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)
