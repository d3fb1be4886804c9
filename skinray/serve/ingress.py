"""What a request goes through in the ingress: images -> views -> the model deployments -> answers.

Decoding runs here (in a thread, off the event loop), with `decode_views`: the decode and warp of
bulk scoring and evaluation. At most `serve.decode_slots` images decode at once in a replica, each
refused from its header past `serve.max_pixels`, so that a flood of small files claiming many pixels
cannot take more memory than the replica reserved; a request waits for a slot, one image at a time.
The model deployments return raw logits; `Predictor.combine` calibrates and weights them, so an
image gets the probabilities `skinray score` gives it.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from PIL import Image

from skinray.data.decode import DecodeError
from skinray.data.ingest import decode_photo, decode_views, views_of
from skinray.predictor import Prediction, Predictor
from skinray.serve.guards import Keys, RequestMetrics, overloaded, unavailable
from skinray.serve.prediction_log import PredictionLog, rows_of

READY_TIMEOUT_S = 2.0
READY_CACHE_S = 1.0  # a flood of readiness probes asks the model replicas at most once a second


class Service:
    def __init__(
        self, predictor: Predictor, models: list[tuple[object, list[int]]], cfg, key_digests: set[str]
    ):
        self.predictor, self.models, self.cfg = predictor, models, cfg
        self.keys = Keys(key_digests)
        self.metrics = RequestMetrics()
        self.sizes = predictor.sizes
        self.decode_slots = asyncio.Semaphore(cfg.decode_slots)
        self._readiness: tuple[float, asyncio.Task] | None = None
        self.prediction_log = PredictionLog.of(cfg)

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

    async def predict(self, views: list[dict[int, np.ndarray]]) -> Prediction:
        """Views of n images -> the ensemble's calibrated prediction (n may be 0)."""
        if not views:
            return self.predictor.combine(
                np.zeros((len(self.predictor.members), 0, len(self.predictor.classes))), np.zeros(0)
            )
        stacked = {size: np.stack([v[size] for v in views]) for size in self.sizes}
        calls = [
            handle.remote({m_size: stacked[m_size] for m_size in self._sizes_of(group)})
            for handle, group in self.models
        ]
        try:
            parts = await asyncio.gather(*calls)
        except Exception as exc:
            raise _unavailable(exc) from None
        from skinray.conformal import draws

        logits = np.concatenate([z for z, _ in parts], axis=0)  # the groups list the members in order
        scores = [s for _, s in parts]
        member_ood = None if any(s is None for s in scores) else np.concatenate(scores, axis=0)
        return self.predictor.combine(logits, draws(stacked[max(self.sizes)]), member_ood)

    async def explain(self, image: Image.Image, views: dict[int, np.ndarray]) -> tuple[dict, bytes]:
        """One photo and its views -> (its answer, the explanation drawn as a PNG)."""
        from skinray.explain import png, render

        prediction = await self.predict([views])
        (answer,) = self.answers(prediction)
        one = {size: view[None] for size, view in views.items()}
        calls = [
            handle.explain.remote({s: one[s] for s in self._sizes_of(group)}, prediction.labels)
            for handle, group in self.models
        ]
        try:
            parts = await asyncio.gather(*calls)
        except Exception as exc:
            raise _unavailable(exc) from None
        cams = [cam[0] for part in parts for cam in part]  # the groups list the members in order
        weights = [m.weight for m in self.predictor.members]
        return answer, await asyncio.to_thread(lambda: png(render(image, cams, weights)))

    def _sizes_of(self, group: list[int]) -> set[int]:
        return {self.predictor.members[i].image_size for i in group}

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
                asyncio.gather(*(h.ready.remote() for h, _ in self.models)), READY_TIMEOUT_S
            )
            return True
        except Exception:
            return False

    # === Answers ===

    def answers(self, prediction: Prediction) -> list[dict]:
        """One answer per image (`Prediction.answers`); counted in the metrics."""
        answers = prediction.answers(self.predictor.classes, self.cfg.top_k)
        for answer in answers:
            self.metrics.predicted(answer["label"], answer["abstained"])
        return answers

    def log(
        self,
        route: str,
        request_id: str,
        answers: list[dict],
        inputs: list[tuple[int, bytes | None]],
        started: float,
    ) -> None:
        """The answers of one request into the prediction log (when there is one and the request is
        sampled): queued, never waited on. `inputs`: each answered image's size and bytes."""
        if self.prediction_log is not None and answers and self.prediction_log.sampled():
            self.prediction_log.add(
                rows_of(answers, self.predictor.version, route, request_id, since_ms(started), inputs)
            )

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
            "max_batch_size": self.cfg.max_batch_size,
            "prediction_log": self.prediction_log is not None,
        }


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
