"""The Serve application: an HTTP ingress that decodes, and model deployments that batch.

    serve run skinray.serve.app:build_app model=BUNDLE        (or `skinray serve --model BUNDLE`)

`build_app(args)` is a Serve application builder, so the same application deploys from a Serve
config file (`skinray serve --print-config`) with `serve deploy`. Its args: `model` (a bundle, run,
checkpoint or `.keras`, local path or URI every replica can read) and `serve` (a mapping of
`ServeConfig` settings).

Layout (`serve.layout`): `together` is one model deployment holding every member; `per_member` is one
deployment per member, called concurrently by the ingress. Either way the ingress decodes each
image once, warps it to each member's size with the code bulk scoring uses, and combines the members'
logits with `Predictor.combine`, so online and bulk scoring give the same probabilities.
"""

from __future__ import annotations

import asyncio

import numpy as np
import yaml
from ray import serve

from skinray import UserError
from skinray.config import ServeConfig, load_config_text

APP_NAME = "skinray"


@serve.deployment
class Model:
    """Some members of the ensemble (all of them, or one): uint8 views keyed by size -> raw logits.

    Requests are batched across callers (`@serve.batch`): the views of every waiting request are
    concatenated per size and each member runs once over them.
    """

    def __init__(
        self,
        model: str,
        version: str,
        members: list[int],
        max_batch_size: int,
        batch_wait_s: float,
        gpus: float,
        precision: str = "float32",
    ):
        from skinray.console import load_tensorflow, quiet_process, say

        quiet_process()
        load_tensorflow(expect_gpu=gpus > 0)
        from skinray.explain import Explainer
        from skinray.predictor import Predictor
        from skinray.serve.guards import batch_size_histogram

        # The version the application was built for, or nothing: a replica (re)started after the
        # bundle at `model` was replaced never serves the other one beside it.
        predictor = Predictor.from_path(model, load_models=False, expect_version=version)
        self.members = [predictor.members[i] for i in members]
        predictor.load_models(self.members)
        chosen, why = predictor.to_precision(precision)
        say(f"model replica computes in {chosen} ({why})")
        self.explainer = Explainer(self.members)
        self.logits_batch.set_max_batch_size(max_batch_size)
        self.logits_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.batch_sizes = batch_size_histogram()
        # Warm-up: the first call of a Keras model traces it. Serve routes no request to a replica
        # before this constructor returns, so readiness means "loaded and answered".
        self._run(
            [{m.image_size: np.zeros((1, m.image_size, m.image_size, 3), np.uint8) for m in self.members}]
        )

    async def __call__(self, views: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(members here, n, classes) logits for n images, and the members' (members here, n)
        out-of-distribution scores (None without references)."""
        return await self.logits_batch(views)

    def ready(self) -> bool:
        return True

    async def explain(self, views: dict[int, np.ndarray], classes: np.ndarray) -> list[np.ndarray]:
        """Grad-CAM maps of the members here, one (n, h, w) array each, for `classes` (one per image).
        Not batched: a backward pass per request, off the event loop."""
        return await asyncio.to_thread(self.explainer.cams, views, classes)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)  # both set from the config at start
    async def logits_batch(self, requests: list[dict[int, np.ndarray]]) -> list[tuple]:
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[dict[int, np.ndarray]]) -> list[tuple]:
        counts = [len(next(iter(r.values()))) for r in requests]
        self.batch_sizes.observe(sum(counts))
        runs = [m.run(np.concatenate([r[m.image_size] for r in requests])) for m in self.members]
        cuts = np.cumsum(counts)[:-1]
        logits = np.split(np.stack([z for z, _ in runs]), cuts, axis=1)
        if any(s is None for _, s in runs):
            return [(z, None) for z in logits]
        return list(zip(logits, np.split(np.stack([s for _, s in runs]), cuts, axis=1)))


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP front: request guards, decoding, and the models' answers turned into responses."""

    def __init__(self, arms: list[dict], key_digests: list[str], cfg: dict):
        from skinray.console import quiet_process
        from skinray.predictor import Predictor
        from skinray.serve.ingress import Arm, Service

        quiet_process()
        serve_cfg = serve_section(cfg)
        self.service = Service(
            [
                Arm(
                    a["role"],
                    Predictor.from_path(a["model"], load_models=False, expect_version=a["version"]),
                    list(zip(a["handles"], a["groups"])),
                )
                for a in arms
            ],
            serve_cfg,
            set(key_digests),
        )

    def __del__(self):
        """Serve stops the replica: what the prediction log holds is written first."""
        service = getattr(self, "service", None)  # None when the constructor failed
        if service is not None:
            service.close()

    def __serve_build_asgi_app__(self):
        from skinray.serve.routes_v1 import make_app

        return make_app(self.service)


ROLES = ("stable", "canary", "shadow")


def build_app(args: dict) -> serve.Application:
    """The application for `args` = {"model": PATH, "serve": {ServeConfig settings}}.

    Each version (the stable `model`, and `serve.canary` and `serve.shadow` when set) gets model
    deployments of its own, named after its version: an ingress only ever calls the replicas of
    the versions it was built with, so while Serve replaces an application's replicas one by one
    (a redeploy with another bundle), every answer is computed by the version it names."""
    from skinray.bundle import check_promoted
    from skinray.predictor import Predictor, describe_difference
    from skinray.serve.guards import key_digests
    from skinray.storage import absolute

    if not args.get("model"):
        raise UserError("no model given: pass model=BUNDLE_OR_RUN (skinray serve --model ...)")
    settings = dict(args.get("serve") or {})
    cfg = serve_section(settings)
    paths = {"stable": str(args["model"]), "canary": cfg.canary, "shadow": cfg.shadow}
    arms, versions = [], {}
    for role in ROLES:
        if not paths[role]:
            continue
        model = absolute(paths[role])
        # A bad path or version fails here, before deploying.
        expect = cfg.expect_version if role == "stable" else ""
        predictor = Predictor.from_path(model, load_models=False, expect_version=expect)
        check_promoted(predictor.manifest, predictor.source, cfg.allow_unpromoted)
        if predictor.version in versions:
            raise UserError(
                f"the {role} ({paths[role]}) is the {versions[predictor.version]}'s model "
                f"(version {predictor.version[:16]})"
            )
        if arms and predictor.classes != arms[0]["predictor"].classes:
            difference = describe_difference(
                arms[0]["predictor"].classes, predictor.classes, ("stable", role)
            )
            raise UserError(
                f"the {role} ({paths[role]}) has other classes than the stable model: {difference}"
            )
        versions[predictor.version] = role
        arms.append({"role": role, "model": model, "predictor": predictor})
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        ray_actor_options=cfg.ingress_options,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        max_queued_requests=cfg.ingress_max_ongoing_requests,
    ).bind([_bound(cfg, arm) for arm in arms], sorted(key_digests(cfg)), settings)


def _bound(cfg: ServeConfig, arm: dict) -> dict:
    """One version's model deployments (bound), as the ingress takes them."""
    # The version each replica must find (empty for a run, which has no sealed version).
    predictor, version = arm["predictor"], arm["predictor"].bundle_version
    groups = (
        [[i] for i in range(len(predictor.members))]
        if cfg.layout == "per_member"
        else [list(range(len(predictor.members)))]
    )
    name = f"Model-{_short(predictor.version)}"
    names = [name] if len(groups) == 1 else [f"{name}-{predictor.members[g[0]].name}" for g in groups]
    handles = [
        _model_deployment(cfg, n).bind(
            arm["model"],
            version,
            g,
            cfg.max_batch_size,
            cfg.batch_wait_s,
            cfg.gpus_per_replica,
            cfg.precision,
        )
        for n, g in zip(names, groups)
    ]
    return {
        "role": arm["role"],
        "model": arm["model"],
        "version": version,
        "handles": handles,
        "groups": groups,
    }


def _short(version: str) -> str:
    """A version as a deployment name takes it: a bundle's first 12 hex digits; a run's checkpoint
    path as a digest of it."""
    import hashlib

    if len(version) == 64 and all(c in "0123456789abcdef" for c in version):
        return version[:12]
    return hashlib.sha256(version.encode()).hexdigest()[:12]


def serve_section(settings: dict) -> ServeConfig:
    """The `serve` section from a mapping of its settings, validated like a config file's."""
    return load_config_text(yaml.safe_dump({"serve": settings})).serve


def _model_deployment(cfg: ServeConfig, name: str):
    return Model.options(
        name=name,
        autoscaling_config={
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=cfg.replica_options,
    )
