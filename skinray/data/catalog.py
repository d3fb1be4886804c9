"""Archive -> catalog of (path, label, label_index, split) rows; splits; class weights.

The first stage of the data flow. An archive is a folder per class, on local disk or any filesystem
pyarrow.fs understands (s3://, gs://, hdfs://), either split (`train/<class>/...`, `test/<class>/...`,
as DermNet on Kaggle) or flat (`<class>/...`, all of it training data). Files are found recursively
below each class folder; hidden files and non-images are skipped and counted, never read.

The class index map is the sorted list of class folder names over all splits: stable for a given
archive, and saved with every model so that an index always means the same class.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skinray import UserError, storage
from skinray.data.decode import is_image_name

METADATA_FILES = ("metadata.csv", "metadata.parquet")  # beside the split folders: skinray.subgroups
SPLIT_ALIASES = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
SCHEMA = pa.schema(
    [("path", pa.string()), ("label", pa.string()), ("label_index", pa.int32()), ("split", pa.string())]
)


class ArchiveError(UserError, ValueError):
    """The archive cannot be read, or holds no usable class folders."""


# === Listing ===


@dataclass
class Catalog:
    """Every image file of an archive, labelled, with what was skipped and why."""

    root: str
    classes: list[str]
    table: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)
    filesystem: object = None  # the archive's pyarrow filesystem (storage.resolve)
    prefix: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> pa.Table:
        return self.table.filter(pc.equal(self.table["split"], name))

    @property
    def split_names(self) -> list[str]:
        return sorted(set(self.table["split"].to_pylist()))


def is_hidden(relative: str | PurePosixPath) -> bool:
    """A file no one meant as an input: a dot-file or one inside a dot-folder or macOS's __MACOSX."""
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(relative).parts)


def list_archive(uri: str) -> Catalog:
    """Lists a folder-per-class archive.

    Example:
        >>> catalog = list_archive("data/dermnet")
        >>> catalog.classes[:1], catalog.split("train").num_rows
    """
    if storage.kind(uri) != "dir":
        raise ArchiveError(f"archive '{uri}' is not a folder that can be read")
    fs, root, prefix, files = storage.list_files(uri)
    rel_files = [PurePosixPath(f) for f in files]
    top_dirs = {p.parts[0].lower() for p in rel_files if len(p.parts) > 1}
    split_layout = "train" in top_dirs

    rows, skipped = [], Counter()
    for rel in rel_files:
        parts = rel.parts
        if rel.as_posix() in METADATA_FILES:  # the archive's metadata (skinray.subgroups), not an image
            continue
        if is_hidden(rel):
            skipped["hidden"] += 1
            continue
        if split_layout:
            split = SPLIT_ALIASES.get(parts[0].lower())
            if split is None:
                skipped["outside a split folder"] += 1
                continue
            parts = parts[1:]
        else:
            split = "train"
        if len(parts) < 2:
            skipped["not inside a class folder"] += 1
            continue
        if not is_image_name(parts[-1]):
            skipped["not an image file name"] += 1
            continue
        rows.append((prefix + f"{root}/{rel.as_posix()}", parts[0], split))

    if not rows:
        raise ArchiveError(
            f"archive '{uri}' holds no images in class folders "
            "(expected <class>/<image> or train/<class>/<image>)"
        )
    rows.sort()
    classes = sorted({label for _, label, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    table = pa.table(
        {
            "path": [r[0] for r in rows],
            "label": [r[1] for r in rows],
            "label_index": pa.array([index[r[1]] for r in rows], pa.int32()),
            "split": [r[2] for r in rows],
        },
        schema=SCHEMA,
    )
    return Catalog(uri, classes, table, dict(skipped), fs, prefix)


# === Splits and weights ===


def train_val_split(table: pa.Table, val_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Stratified split: each class keeps `val_fraction` of its rows for validation.

    Deterministic for a seed. A class with a single image stays in training, where it is needed.
    """
    labels = table["label_index"].to_numpy()
    rng = np.random.default_rng(seed)
    val_rows = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) >= 2 and val_fraction > 0:
            n_val = min(max(n_val, 1), len(rows) - 1)
            val_rows.extend(rng.permutation(rows)[:n_val])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[np.asarray(val_rows, dtype=np.int64)] = True
    return table.filter(pa.array(~is_val)), table.filter(pa.array(is_val))


def splits(catalog: Catalog, val_fraction: float, seed: int) -> dict[str, pa.Table]:
    """The train, val and (when the archive has one) test tables.

    An archive's own `val/` folder is used as is; otherwise validation is carved from `train/`.
    """
    out = {}
    if "val" in catalog.split_names:
        out["train"], out["val"] = catalog.split("train"), catalog.split("val")
    else:
        out["train"], out["val"] = train_val_split(catalog.split("train"), val_fraction, seed)
    if "test" in catalog.split_names:
        out["test"] = catalog.split("test")
    return out


def model_split(catalog: Catalog, split: str, classes: list[str], data_cfg) -> pa.Table:
    """A split's rows as a trained model sees them: validation carved with the model's own seed and
    fraction (`data_cfg`, a DataConfig), `label_index` in the model's class order.

    An archive class the model does not know is an error; so is a split the archive lacks.
    """
    parts = splits(catalog, data_cfg.val_fraction, data_cfg.seed)
    if split not in parts:
        raise ArchiveError(f"archive '{catalog.root}' has no {split} split (it has: {', '.join(parts)})")
    unknown = sorted(set(catalog.classes) - set(classes))
    if unknown:
        raise ArchiveError(f"the model does not know the archive's classes: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    table = parts[split]
    return table.set_column(
        table.schema.get_field_index("label_index"),
        "label_index",
        pa.array([index[c] for c in table["label"].to_pylist()], pa.int32()),
    )


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """'balanced' weights (scikit-learn): n_samples / (n_classes * count); 0 for absent classes."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.zeros(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return [float(w) for w in weights]
