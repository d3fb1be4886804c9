"""A trained model or an ensemble bundle -> calibrated class probabilities: the one scoring entry point.

`Predictor.from_path` opens an ensemble bundle (a folder with `bundle.json`, see `skinray.bundle`),
a training run directory (its best checkpoint), a checkpoint directory, or a `.keras` file, on
local disk or any pyarrow.fs URI. A run or checkpoint is a one-member ensemble without calibration
(temperature 1, weight 1, no abstention), so every consumer handles both the same way.

Members may take different input sizes (224, 299, 384): the caller decodes each image once and
warps it once to each size in `Predictor.sizes` (`skinray.data.ingest.decode_views`), and
`predict` takes those views keyed by size. Each model's first layer applies its backbone's own
preprocessing, so evaluation, bulk scoring and serving feed the same uint8 pixels and get the
same probabilities for the same file.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from skinray import UserError, rundir
from skinray.bundle import MANIFEST, check_version, read_verified, verify
from skinray.config import Config, load_config
from skinray.storage import local_copy, redact


@dataclass
class Member:
    """One model of an ensemble and how its logits are calibrated and weighted."""

    name: str
    model: object  # keras.Model: uint8 (n, size, size, 3) -> logits
    backbone: str
    image_size: int
    temperature: float = 1.0
    weight: float = 1.0
    config: Config = field(default_factory=Config)
    file: Path | None = None  # the local model.keras it was loaded from
    ood_statistics: dict | None = None  # a bundle member's class means and precision (`skinray.ood`)
    ood_scale: float = 1.0  # the member's typical in-distribution score
    _forward: object = field(default=None, repr=False, compare=False)

    def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 (n, size, size, 3) -> float32 (n, classes) logits and (n, d) pooled backbone features
        (None for a model without skinray's `pool` layer), in one pass.

        Through one traced graph for every batch size: an eager call of a deep Keras model pays
        Python per layer (seen here: ResNet50 at 96 px, 614 ms eager against 44 ms traced for one
        image; EfficientNetV2S 1188 against 50).
        """
        if self._forward is None:
            import keras
            import tensorflow as tf

            try:
                outputs = [self.model.outputs[0], self.model.get_layer("pool").output]
                both = keras.Model(self.model.inputs, outputs)
            except ValueError:
                both = self.model
            spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.uint8)
            self._forward = tf.function(
                lambda x: both(x, training=False), input_signature=[spec], jit_compile=False
            )
        out = self._forward(images)
        if isinstance(out, (list, tuple)):
            return np.asarray(out[0], np.float32), np.asarray(out[1], np.float32)
        return np.asarray(out, np.float32), None

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float32 (n, classes) logits."""
        return self.forward(images)[0]

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and, for a bundle member with a reference, out-of-distribution scores (n,)."""
        logits, features = self.forward(images)
        return logits, self.ood_scores(features)

    def ood_scores(self, features: np.ndarray | None) -> np.ndarray | None:
        if self.ood_statistics is None or features is None:
            return None
        from skinray.ood import mahalanobis_scores

        return mahalanobis_scores(self.ood_statistics, features)


@dataclass
class Prediction:
    """Calibrated probabilities of a batch: the ensemble's and each member's."""

    probabilities: np.ndarray  # (n, classes): the weighted mean of the members' calibrated probabilities
    member_probabilities: np.ndarray  # (members, n, classes), each member calibrated
    member_logits: np.ndarray  # (members, n, classes), raw
    threshold: float  # top probability below which the ensemble abstains
    draws: np.ndarray | None = None  # (n,) each image's u for its differential (`conformal.draws`)
    set_threshold: float | None = None  # the differential sets' score threshold; None: no sets fitted
    ood_scores: np.ndarray | None = None  # (n,) the ensemble's out-of-distribution score (`skinray.ood`)
    ood_threshold: float | None = None  # above it an image is refused; None: no refusal fitted
    member_features: list[np.ndarray] | None = None  # each member's pooled features, when asked for

    @property
    def labels(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    @property
    def out_of_distribution(self) -> np.ndarray:
        """(n,) bool: unlike the images the bundle was fitted on: refused, whatever the confidence."""
        if self.ood_scores is None or self.ood_threshold is None:
            return np.zeros(len(self.probabilities), bool)
        return self.ood_scores > self.ood_threshold

    @property
    def abstained(self) -> np.ndarray:
        return (self.confidence < self.threshold) | self.out_of_distribution

    @property
    def reasons(self) -> list[str | None]:
        """Why each image is not answered: None (answered), "uncertain, refer", or `ood.REASON`."""
        from skinray.ood import REASON

        ood, unsure = self.out_of_distribution, self.confidence < self.threshold
        return [REASON if o else "uncertain, refer" if u else None for o, u in zip(ood, unsure)]

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, probabilities) of the k most probable classes per image, most probable first."""
        k = min(k, self.probabilities.shape[1])
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return order, np.take_along_axis(self.probabilities, order, axis=1)

    @property
    def in_set(self) -> np.ndarray | None:
        """(n, classes) bool: each image's differential set; None for a model without fitted sets."""
        if self.set_threshold is None or self.draws is None:
            return None
        from skinray.conformal import sets

        inside = sets(self.probabilities, self.draws, self.set_threshold)
        inside[self.out_of_distribution] = False  # refused: nothing remains possible to say
        return inside

    def differentials(self, classes: list[str]) -> list[list[str] | None]:
        """Each image's differential: the labels of its set, most probable first (None: no sets)."""
        inside = self.in_set
        if inside is None:
            return [None] * len(self.probabilities)
        from skinray.conformal import differential

        return differential(self.probabilities, inside, classes)

    def answers(self, classes: list[str], k: int) -> list[dict]:
        """One {label, confidence, top_k: [{label, probability}], differential, abstained, reason,
        out_of_distribution, ood_score} per image: what the endpoint answers and an explanation's
        caption says."""
        order, probs = self.top_k(k)
        differentials, reasons = self.differentials(classes), self.reasons
        ood, abstained = self.out_of_distribution, self.abstained
        return [
            {
                "label": classes[int(self.labels[i])],
                "confidence": float(self.confidence[i]),
                "top_k": [
                    {"label": classes[int(j)], "probability": float(p)} for j, p in zip(order[i], probs[i])
                ],
                "differential": differentials[i],
                "abstained": bool(abstained[i]),
                "reason": reasons[i],
                "out_of_distribution": bool(ood[i]),
                "ood_score": None if self.ood_scores is None else float(self.ood_scores[i]),
            }
            for i in range(len(self.probabilities))
        ]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def weighted_mean(member_probabilities: np.ndarray, weights) -> np.ndarray:
    """The ensemble's probabilities: members' (members, n, classes) averaged with normalised weights."""
    weights = np.asarray(weights, np.float64)
    return np.tensordot(weights / weights.sum(), np.asarray(member_probabilities, np.float64), axes=1)


@dataclass
class Predictor:
    members: list[Member]
    classes: list[str]
    source: str  # where it was loaded from
    threshold: float = 0.0
    version: str = ""  # the bundle's content hash; a run's checkpoint path otherwise
    manifest: dict = field(default_factory=dict)  # bundle.json (empty for a run)
    precision: str = ""  # what the models compute in once `to_precision` readied them; "" as loaded

    @property
    def sizes(self) -> tuple[int, ...]:
        """The distinct input sizes the members take, ascending."""
        return tuple(sorted({m.image_size for m in self.members}))

    @property
    def image_size(self) -> int:
        """The largest input size (what to decode for)."""
        return self.sizes[-1]

    def load_models(self, members: list[Member]) -> None:
        """Loads the Keras models of some `members` of a predictor made with `load_models=False`; a
        bundle's from the bytes its digest is checked on (`skinray.bundle.read_verified`), with
        their out-of-distribution references."""
        entries = {entry["name"]: entry for entry in self.manifest.get("members", [])}
        for member in members:
            entry, data = entries.get(member.name), None
            if entry is not None:
                folder = Path(str(member.file)[: -len(entry["file"])])
                data = read_verified(folder, self.manifest, entry["file"])
                if entry.get("ood_statistics"):
                    from skinray.ood import load_statistics

                    stored = read_verified(folder, self.manifest, entry["ood_statistics"])
                    member.ood_statistics = load_statistics(stored)
            member.model = load_model(member.file, data)

    def to_precision(self, precision: str) -> tuple[str, str]:
        """Readies the loaded members' models for inference in `precision` (`skinray.precision`:
        rebuilt with their BatchNormalizations folded; auto is resolved for this process's device);
        returns (the precision chosen, why). Logits stay float32. The inference engines (score's
        actors, Serve's replicas) call it; models loaded to train from or export are left as saved."""
        from skinray.precision import in_precision, resolve

        chosen, why = resolve(precision)
        for member in self.members:
            if member.model is not None and chosen != self.precision:
                member.model, member._forward = in_precision(member.model, chosen), None
        self.precision = chosen
        return chosen, why

    @property
    def bundle_version(self) -> str:
        """The bundle's version, which the processes that load the models again must find; empty
        for runs and checkpoints (which have no sealed version)."""
        return self.version if self.manifest else ""

    @property
    def set_threshold(self) -> float | None:
        """The differential sets' score threshold (`skinray.conformal`): a bundle's; None for a run
        or a bundle without sets; infinity when its calibration images were too few (every class)."""
        fitted = self.manifest.get("differential")
        if not fitted:
            return None
        return math.inf if fitted["threshold"] is None else float(fitted["threshold"])

    @property
    def ood_threshold(self) -> float | None:
        """The ensemble's out-of-distribution threshold (`skinray.ood`); None: nothing is refused."""
        fitted = self.manifest.get("ood")
        if not fitted:
            return None
        return math.inf if fitted["threshold"] is None else float(fitted["threshold"])

    @property
    def config(self) -> Config:
        """The first member's resolved config (data settings: split seed, fraction, pixel limit)."""
        return self.members[0].config

    @classmethod
    def from_path(cls, path: str, load_models: bool = True, expect_version: str = "") -> Predictor:
        """Loads a bundle, a run directory, a checkpoint directory or a `.keras` file.

        With `load_models=False` the members carry everything but their Keras models (which take
        TensorFlow and seconds per model to load): what a driver needs to plan the work its actors do.
        `expect_version`: refuse a bundle of any other version (and anything that is not a bundle).
        """
        local = _local_copy(path)
        shown = redact(path)  # the source and a run's version are printed, stored and served
        if (local / MANIFEST).is_file():
            return cls.from_bundle(
                local, source=shown, load_models=load_models, expect_version=expect_version
            )
        if expect_version:
            raise UserError(f"'{shown}' is not a bundle: an expected version applies to bundles only")
        return cls.from_checkpoint(local, source=shown, load_models=load_models)

    @classmethod
    def from_bundle(
        cls, folder: Path, source: str = "", load_models: bool = True, expect_version: str = ""
    ) -> Predictor:
        """A bundle folder (local), verified against its manifest first (`skinray.bundle.verify`); each
        model is loaded from the bytes its digest was checked on."""
        manifest = verify(folder)
        check_version(manifest, expect_version, source or str(folder))
        members = []
        for entry in manifest["members"]:
            members.append(
                Member(
                    entry["name"],
                    None,
                    entry["backbone"],
                    int(entry["image_size"]),
                    float(entry["temperature"]),
                    float(entry["weight"]),
                    load_config(folder / entry["config"]),
                    folder / entry["file"],
                    ood_scale=float(entry.get("ood_scale", 1.0)),
                )
            )
        predictor = cls(
            members,
            list(manifest["classes"]),
            source or str(folder),
            float(manifest["threshold"]),
            manifest["version"],
            manifest,
        )
        if load_models:
            predictor.load_models(members)
        return predictor

    @classmethod
    def from_paths(cls, paths: list[str], load_models: bool = True, expect_version: str = "") -> Predictor:
        """One path as `from_path`; several runs or checkpoints as an uncalibrated, equally weighted
        ensemble (what `skinray ensemble` fits the calibration of)."""
        if len(paths) == 1:
            return cls.from_path(paths[0], load_models, expect_version)
        parts = [cls.from_path(path, load_models) for path in paths]
        for path, part in zip(paths, parts):
            if part.manifest:
                raise UserError(f"'{path}' is a bundle: it cannot be combined with other models")
        for path, part in zip(paths[1:], parts[1:]):
            if part.classes != parts[0].classes:
                raise UserError(
                    f"'{paths[0]}' and '{path}' have different classes: "
                    f"{describe_difference(parts[0].classes, part.classes)}"
                )
        members = [m for part in parts for m in part.members]
        for i, member in enumerate(members):
            member.name = f"{i:02d}-{member.backbone}"
        return cls(members, parts[0].classes, ",".join(paths), version="uncalibrated")

    @classmethod
    def from_checkpoint(cls, local: Path, source: str = "", load_models: bool = True) -> Predictor:
        """A run directory, checkpoint or `.keras` file (local) as a one-member, uncalibrated ensemble."""
        checkpoint = _checkpoint_dir(local) if local.is_dir() else local.parent
        model_file = checkpoint / rundir.MODEL if local.is_dir() else local
        if not model_file.is_file():
            raise UserError(f"no {rundir.MODEL} found at '{source or local}'")
        classes_file = checkpoint / rundir.CLASSES
        if not classes_file.is_file():
            raise UserError(f"'{source or local}' has no {rundir.CLASSES} next to its model")
        config_file = checkpoint / rundir.CONFIG
        config = load_config(config_file) if config_file.is_file() else load_config()
        described = checkpoint / rundir.DESCRIPTION
        if load_models or not described.is_file():
            model = load_model(model_file)
            size = int(model.input_shape[1])
        else:
            model, size = None, int(json.loads(described.read_text())["image_size"])
        member = Member(
            config.model.backbone, model, config.model.backbone, size, config=config, file=model_file
        )
        # Named by where it came from (a remote run is read from a local copy): the run and its checkpoint.
        version = source or str(checkpoint)
        if local.is_dir() and checkpoint != local:
            from skinray.storage import join_uri

            version = join_uri(version, checkpoint.name)
        return cls([member], json.loads(classes_file.read_text()), str(checkpoint), version=version)

    # === Scoring ===

    def predict(self, views: dict[int, np.ndarray] | np.ndarray, keep_features: bool = False) -> Prediction:
        """uint8 images, keyed by input size (one array when all members share one) -> Prediction.

        Each image's draw for its differential is a hash of its largest view (`conformal.draws`).
        `keep_features`: the members' pooled features too (what `skinray ensemble` fits on)."""
        from skinray.conformal import draws

        if isinstance(views, np.ndarray):
            views = {size: views for size in self.sizes}
        n = len(next(iter(views.values())))
        if n == 0:
            empty = np.zeros((len(self.members), 0, len(self.classes)), np.float32)
            return self.combine(empty, np.zeros(0))
        outputs = [m.forward(views[m.image_size]) for m in self.members]
        scores = [m.ood_scores(f) for m, (_, f) in zip(self.members, outputs)]
        member_ood = None if any(s is None for s in scores) else np.stack(scores)
        prediction = self.combine(np.stack([z for z, _ in outputs]), draws(views[max(views)]), member_ood)
        if keep_features:
            prediction.member_features = [f for _, f in outputs]
        return prediction

    def combine(
        self, member_logits: np.ndarray, draws: np.ndarray | None = None, member_ood: np.ndarray | None = None
    ) -> Prediction:
        """Members' raw logits (members, n, classes) -> calibrated, weighted probabilities (and,
        with the images' `draws`, their differentials; with the members' out-of-distribution
        scores (members, n), the ensemble's)."""
        calibrated = np.stack([softmax(z, m.temperature) for z, m in zip(member_logits, self.members)])
        weights = [m.weight for m in self.members]
        ensemble = weighted_mean(calibrated, weights)
        ood_scores = None
        if member_ood is not None and self.ood_threshold is not None:
            from skinray.ood import combine

            ood_scores = combine(member_ood, [m.ood_scale for m in self.members])
        return Prediction(
            ensemble.astype(np.float32),
            calibrated,
            member_logits,
            self.threshold,
            draws,
            self.set_threshold,
            ood_scores,
            self.ood_threshold,
        )

    def combine_uncalibrated(self, member_logits: np.ndarray) -> Prediction:
        """The same members before calibration: temperature 1, equal weights (the baseline)."""
        plain = [replace(m, temperature=1.0, weight=1.0) for m in self.members]
        return replace(self, members=plain).combine(member_logits)


def describe_difference(
    a: list[str], b: list[str], labels: tuple[str, str] = ("only in the first", "only in the second")
) -> str:
    """Says how two class lists differ: which names only one has, or that the order differs."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        return f"{labels[0]}: {only_a or 'none'}; {labels[1]}: {only_b or 'none'}"
    return "the same names in another order"


def load_model(path: Path, data: bytes | None = None):
    """A skinray `.keras` model, loaded with Keras' safe mode (no arbitrary code from the file).
    Only the `.keras` format: safe mode does not guard the legacy HDF5 one. With `data`, the model
    is read from those bytes (a bundle's verified copy of `path`), not from the file again."""
    if Path(path).suffix != ".keras":
        raise UserError(f"'{path}' is not a .keras model file: only the .keras format loads (safe mode)")
    import keras

    import skinray.models.classifier  # noqa: F401  registers the custom layers for loading

    try:
        if data is None:
            return keras.models.load_model(path, compile=False, safe_mode=True)
        from keras.src.saving import saving_lib  # the public loader takes paths only; this one, a file object

        return saving_lib.load_model(io.BytesIO(data), compile=False, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        first = str(exc).split(". ")[0]
        raise UserError(
            f"'{path}' is refused: it holds Python code, which Keras' safe mode never runs ({first}). "
            "skinray's models hold none: was this file made by skinray?"
        ) from None


def _local_copy(path: str) -> Path:
    """Remote runs, checkpoints and bundles are copied to a temporary folder once; local paths are
    used in place."""
    try:
        return local_copy(path)
    except FileNotFoundError:
        raise UserError(f"model path '{path}' does not exist") from None


def _checkpoint_dir(folder: Path) -> Path:
    """A checkpoint is itself; a run directory resolves to its best checkpoint (`rundir.best_checkpoint`)."""
    checkpoint = rundir.best_checkpoint(folder)
    if checkpoint is None:
        raise UserError(f"'{folder}' is neither a bundle, a checkpoint nor a run directory with checkpoints")
    return checkpoint
