"""A trained model -> class probabilities for batches of images: the one scoring entry point.

`Predictor.from_path` accepts a training run directory (its best checkpoint), a checkpoint
directory, or a `.keras` file, on local disk or any pyarrow.fs URI; the ensemble bundle will load
through the same class. It carries the class names and the input size, and scores the uint8
images the data pipeline produces (decode, then the identity warp to `image_size`): the model's
own first layer applies the backbone's preprocessing, so evaluation, bulk scoring and serving all
see the same probabilities for the same file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinray import UserError
from skinray.config import Config, load_config
from skinray.data.catalog import resolve


@dataclass
class Predictor:
    model: object  # keras.Model
    classes: list[str]
    image_size: int
    source: str  # where it was loaded from
    config: Config

    @classmethod
    def from_path(cls, path: str) -> "Predictor":
        """Loads a run directory, a checkpoint directory or a `.keras` file."""
        import keras

        import skinray.models.classifier  # noqa: F401  registers the custom layers for loading

        local = _local_copy(path)
        checkpoint = _checkpoint_dir(local) if local.is_dir() else local.parent
        model_file = checkpoint / "model.keras" if local.is_dir() else local
        if not model_file.is_file():
            raise UserError(f"no model.keras found at '{path}'")
        model = keras.models.load_model(model_file, compile=False)
        classes_file = checkpoint / "classes.json"
        if not classes_file.is_file():
            raise UserError(f"'{path}' has no classes.json next to its model")
        config_file = checkpoint / "config.yaml"
        config = load_config(config_file) if config_file.is_file() else load_config()
        return cls(model, json.loads(classes_file.read_text()), int(model.input_shape[1]), str(checkpoint), config)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, size, size, 3) -> probabilities (n, classes), float32."""
        if len(images) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        logits = np.asarray(self.model(images, training=False), dtype=np.float32)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def _local_copy(path: str) -> Path:
    """Remote runs and checkpoints are copied to a temporary folder once; local paths are used in place."""
    if "://" not in path:
        local = Path(path).expanduser()
        if not local.exists():
            raise UserError(f"model path '{path}' does not exist")
        return local
    import pyarrow.fs as pafs

    fs, remote, _ = resolve(path)
    target = Path(tempfile.mkdtemp(prefix="skinray-model-"))
    if fs.get_file_info(remote).type == pafs.FileType.Directory:
        pafs.copy_files(remote, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    name = target / Path(remote).name
    with fs.open_input_stream(remote) as src, open(name, "wb") as out:
        shutil.copyfileobj(src, out)
    return name


def _checkpoint_dir(folder: Path) -> Path:
    """A checkpoint is itself; a run directory resolves to its best checkpoint."""
    if (folder / "model.keras").is_file():
        return folder
    summary = folder / "summary.json"
    if summary.is_file():
        best = Path(json.loads(summary.read_text())["best_checkpoint"])
        if (folder / best.name / "model.keras").is_file():
            return folder / best.name
    checkpoints = sorted(p for p in folder.glob("checkpoint_*") if (p / "model.json").is_file())
    if not checkpoints:
        raise UserError(f"'{folder}' is neither a checkpoint nor a run directory with checkpoints")
    config = load_config(folder / "config.yaml") if (folder / "config.yaml").is_file() else load_config()
    sign = -1 if config.train.monitor_mode == "min" else 1
    return max(checkpoints, key=lambda p: sign * json.loads((p / "model.json").read_text())["metrics"]["checkpoint_score"])
