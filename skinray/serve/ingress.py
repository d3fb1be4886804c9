"""What a request goes through in the ingress: images -> views -> the model deployments -> answers.

Decoding runs here (in a thread, off the event loop), with `decode_views`: the decode and warp of
bulk scoring and evaluation. At most `serve.decode_slots` images decode at once in a replica, each
refused from its header past `serve.max_pixels`, so that a flood of small files claiming many pixels
cannot take more memory than the replica reserved; a request waits for a slot, one image at a time.
The model deployments return raw logits; `Predictor.combine` calibrates and weights them, so an
image gets the probabilities `skinray score` gives it.

Versions (`Arm`s): the stable one answers; a canary answers `serve.canary_percent` of requests
(sticky per client) and falls back to the stable one when it cannot; a shadow scores a copy of
`serve.shadow_percent` of requests after they are answered, into the prediction log and the
agreement metric, never into an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from skinray.data.decode import DecodeError
from skinray.data.ingest import decode_photo, decode_views, views_of
from skinray.predictor import Prediction, Predictor
from skinray.serve.guards import ApiError, Keys, RequestMetrics, overloaded, unavailable
from skinray.serve.prediction_log import PredictionLog, rows_of

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 2.0
READY_CACHE_S = 1.0  # a flood of readiness probes asks the model replicas at most once a second


@dataclass
class Arm:
    """One version in the application: its role, its Predictor (calibration, no models) and its
    model deployments' handles with the members each holds."""

    role: str  # stable, canary or shadow
    predictor: Predictor
    models: list[tuple[object, list[int]]]

    @property
    def version(self) -> str:
        return self.predictor.version


class Service:
    def __init__(self, arms: list[Arm], cfg, key_digests: set[str]):
        self.arms = {arm.role: arm for arm in arms}
        self.stable, self.cfg = self.arms["stable"], cfg
        self.predictor = self.stable.predictor  # the classes and the contract every version shares
        self.keys = Keys(key_digests)
        self.metrics = RequestMetrics()
        for arm in arms:
            self.metrics.reference(arm.version, arm.predictor.manifest.get("reference") or {})
        self.sizes = tuple(sorted({size for arm in arms for size in arm.predictor.sizes}))
        self.decode_slots = asyncio.Semaphore(cfg.decode_slots)
        self._readiness: tuple[float, asyncio.Task] | None = None
        self.prediction_log = PredictionLog.of(cfg)
        self._shadows: set[asyncio.Task] = set()

    # === Inputs ===

    async def decode(self, images: list[bytes]) -> list[dict[int, np.ndarray] | DecodeError]:
        """Each image's views, or the DecodeError saying why it has none."""
        return [await self._decode_one(data) for data in images]

    async def _decode_one(self, data: bytes):
        try:
            return await self._decoded(decode_views, data)
        except DecodeError as exc:
            return exc

    async def decode_photo(self, data: bytes) -> tuple[Image.Image, dict[int, np.ndarray]]:
        """One image -> (the decoded photo, its views); raises DecodeError."""
        return await self._decoded(decode_photo, data)

    async def _decoded(self, decoder, data: bytes):
        async with self.decode_slots:
            return await asyncio.to_thread(decoder, data, self.sizes, self.cfg.max_pixels)

    async def pixel_views(self, pixels: np.ndarray) -> list[dict[int, np.ndarray]]:
        """uint8 (n, height, width, 3) images -> each one's views (the same warp as decoded files)."""
        return await asyncio.to_thread(
            lambda: [views_of(Image.fromarray(p, "RGB"), self.sizes) for p in pixels]
        )

    # === The models ===

    def choose(self, sticky: str | None) -> Arm:
        """The version that answers a request: the canary for its share of clients (by a hash of
        `sticky`, so a client keeps its version), else the stable one."""
        canary = self.arms.get("canary")
        if canary is None or not self.cfg.canary_percent:
            return self.stable
        draw = (
            int.from_bytes(hashlib.sha256(sticky.encode()).digest()[:8]) / 2**64
            if sticky
            else random.random()
        )
        return canary if draw * 100 < self.cfg.canary_percent else self.stable

    async def predict(
        self, views: list[dict[int, np.ndarray]], sticky: str | None = None
    ) -> tuple[Prediction, Arm]:
        """Views of n images -> the calibrated prediction of the version chosen for the request, and
        that version. A canary that cannot answer (no replica, overloaded, dead) hands the request
        to the stable version."""
        arm = self.choose(sticky)
        try:
            return await self._predict(arm, views), arm
        except ApiError as exc:
            if arm is self.stable or exc.status != 503:
                raise
            self.metrics.fallback(arm.version)
            log.warning(
                "the canary %s could not answer (%s): the stable version answers", arm.version[:16], exc
            )
            return await self._predict(self.stable, views), self.stable

    async def _predict(self, arm: Arm, views: list[dict[int, np.ndarray]]) -> Prediction:
        predictor = arm.predictor
        if not views:
            return predictor.combine(
                np.zeros((len(predictor.members), 0, len(predictor.classes))), np.zeros(0)
            )
        stacked = {size: np.stack([v[size] for v in views]) for size in predictor.sizes}
        calls = [
            handle.remote({m_size: stacked[m_size] for m_size in _sizes_of(predictor, group)})
            for handle, group in arm.models
        ]
        try:
            parts = await asyncio.gather(*calls)
        except Exception as exc:
            raise _unavailable(exc) from None
        from skinray.conformal import draws

        logits = np.concatenate([z for z, _ in parts], axis=0)  # the groups list the members in order
        scores = [s for _, s in parts]
        member_ood = None if any(s is None for s in scores) else np.concatenate(scores, axis=0)
        return predictor.combine(logits, draws(stacked[max(predictor.sizes)]), member_ood)

    async def explain(
        self, image: Image.Image, views: dict[int, np.ndarray], sticky: str | None = None
    ) -> tuple[dict, bytes, Arm]:
        """One photo and its views -> (its answer, the explanation drawn as a PNG, the version)."""
        from skinray.explain import png, render

        prediction, arm = await self.predict([views], sticky)
        (answer,) = self.answers(prediction, arm)
        one = {size: view[None] for size, view in views.items()}
        calls = [
            handle.explain.remote({s: one[s] for s in _sizes_of(arm.predictor, group)}, prediction.labels)
            for handle, group in arm.models
        ]
        try:
            parts = await asyncio.gather(*calls)
        except Exception as exc:
            raise _unavailable(exc) from None
        cams = [cam[0] for part in parts for cam in part]  # the groups list the members in order
        weights = [m.weight for m in arm.predictor.members]
        return answer, await asyncio.to_thread(lambda: png(render(image, cams, weights))), arm

    async def ready(self) -> bool:
        """Every model deployment has a replica that loaded its members and answered a warm-up.

        One check serves every probe for `READY_CACHE_S`: probes that arrive while it runs, or just
        after, share its answer."""
        now = time.monotonic()
        if self._readiness is None or now - self._readiness[0] > READY_CACHE_S:
            self._readiness = (now, asyncio.ensure_future(self._ask_ready()))
        return await asyncio.shield(self._readiness[1])

    async def _ask_ready(self) -> bool:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(h.ready.remote() for arm in self.arms.values() for h, _ in arm.models)),
                READY_TIMEOUT_S,
            )
            return True
        except Exception:
            return False

    # === Answers ===

    async def respond(
        self,
        views: list[dict[int, np.ndarray]],
        inputs: list[tuple[int, bytes | None]],
        started: float,
        route: str,
        request_id: str,
        sticky: str | None,
    ) -> tuple[Prediction, list[dict], Arm]:
        """A request's images answered: the version chosen for it predicts, the answers are counted
        and logged, and the shadow gets its copy. `inputs`: each image's size and bytes."""
        prediction, arm = await self.predict(views, sticky)
        answers = self.answers(prediction, arm)
        self.log(route, request_id, answers, inputs, started, arm)
        self.shadow(views, answers, route, request_id, inputs)
        return prediction, answers, arm

    def answers(self, prediction: Prediction, arm: Arm) -> list[dict]:
        """One answer per image (`Prediction.answers`); counted in the metrics under its version."""
        answers = prediction.answers(self.predictor.classes, self.cfg.top_k)
        for answer in answers:
            self.metrics.predicted(
                answer["label"], answer["abstained"], arm.version, answer["out_of_distribution"]
            )
        return answers

    def log(
        self,
        route: str,
        request_id: str,
        answers: list[dict],
        inputs: list[tuple[int, bytes | None]],
        started: float,
        arm: Arm,
    ) -> None:
        """The answers of one request into the prediction log (when there is one and the request is
        sampled): queued, never waited on. `inputs`: each answered image's size and bytes."""
        if self.prediction_log is not None and answers and self.prediction_log.sampled():
            rows = rows_of(answers, arm.version, route, request_id, since_ms(started), inputs, arm.role)
            self.prediction_log.add(rows)

    def shadow(
        self,
        views: list[dict[int, np.ndarray]],
        answers: list[dict],
        route: str,
        request_id: str,
        inputs: list[tuple[int, bytes | None]],
    ) -> None:
        """Has the shadow score a copy of an answered request, in the background (its share of
        requests): its answers are compared with `answers` and logged, never returned. A shadow
        that fails is logged and counted; the request has its answer already."""
        shadow = self.arms.get("shadow")
        if shadow is None or not answers or random.random() * 100 >= self.cfg.shadow_percent:
            return
        task = asyncio.ensure_future(self._shadow(shadow, views, answers, route, request_id, inputs))
        self._shadows.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(self, arm: Arm, views, answers, route, request_id, inputs) -> None:
        started = time.perf_counter()
        try:
            theirs = self.answers(await self._predict(arm, views), arm)
        except Exception as exc:
            self.metrics.shadow_failed(arm.version)
            log.warning("the shadow %s failed on request %s: %s", arm.version[:16], request_id, exc)
            return
        for ours, shadow_answer in zip(answers, theirs):
            self.metrics.shadow_agreed(arm.version, ours["label"] == shadow_answer["label"])
        self.log(route, request_id, theirs, inputs, started, arm)

    def close(self) -> None:
        if self.prediction_log is not None:
            self.prediction_log.close()

    def model_info(self) -> dict:
        p = self.predictor
        return {
            "version": p.version,
            "classes": p.classes,
            "threshold": p.threshold,
            "differential": p.manifest.get("differential"),
            "ood": p.manifest.get("ood"),
            "members": [
                {
                    "name": m.name,
                    "backbone": m.backbone,
                    "image_size": m.image_size,
                    "temperature": m.temperature,
                    "weight": m.weight,
                }
                for m in p.members
            ],
            "validation": p.manifest.get("validation", {}),
            "created": p.manifest.get("created", ""),
            "layout": self.cfg.layout,
            "precision": self.cfg.precision,  # as configured; auto is resolved by each model replica
            "max_batch_size": self.cfg.max_batch_size,
            "prediction_log": self.prediction_log is not None,
            "versions": self.split(),
        }

    def split(self) -> list[dict]:
        """Each version and its share of requests: answered (stable, canary) or copied (shadow)."""
        canary = self.cfg.canary_percent if "canary" in self.arms else 0.0
        shares = {"stable": 100.0 - canary, "canary": canary, "shadow": self.cfg.shadow_percent}
        return [
            {
                "role": role,
                "version": arm.version,
                "percent": shares[role],
                "members": len(arm.predictor.members),
            }
            for role, arm in self.arms.items()
        ]


def _sizes_of(predictor: Predictor, group: list[int]) -> set[int]:
    return {predictor.members[i].image_size for i in group}


def since_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _unavailable(exc: Exception) -> Exception:
    """A model deployment that cannot answer now, as a 503 with Retry-After: overloaded (its queue is
    full), or unavailable (no replica, or the replica died and Serve is replacing it). Anything else
    as it is (the catch-all answers it as a JSON 500)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, BackPressureError):
        return overloaded("the model")
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return unavailable("the model")
    return exc
