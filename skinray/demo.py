"""The end-to-end demo: every stage on a generated archive, on one machine.

    ./dev demo                     (or: skinray demo --out demo-output)     about 12 minutes on 2 cores
    skinray demo --quick           tiny members: about 4 minutes (the tests run this)

sample archive -> the pipeline (data check, a head search with Ray Tune, three members trained with
2 Ray Train workers each from random weights -- ResNet50, InceptionV3 and EfficientNetV2S at reduced
resolution -- the calibrated ensemble, its evaluation beside
its members) -> the test split bulk-scored to Parquet on Ray Data -> the endpoint on Ray Serve, one
photo scored over HTTP, and two images that are not skin -> the page's address. The endpoint stays
up until Ctrl-C (`--exit` ends at once). From random weights, each real backbone learns the sample
archive (test accuracy 0.97-0.98, measured 2026-12-01: README); on DermNet they need ImageNet
weights and the transfer recipe.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from skinray.pipeline import MemberSpec

# 60 photos a class: 288 train, 72 validate (half fit the ensemble, half calibrate the differential
# and the out-of-distribution threshold), 90 test. With 40 (48 validating) the calibration halves
# were 24 images: the weights gave the best test member (ResNet50, 0.95) weight 0 and the
# ensemble trailed it (0.90); measured 2026-12-01.
CLASSES, PER_CLASS = 6, 60
# Every member: from random weights (the scratch recipe), 2 workers, a small search.
SHARED = [
    "model.weights=none",
    "train.workers=2",
    "train.max_failures=1",
    "tune.trials=4",
    "tune.views=1",
    "tune.max_epochs=4",
    "tune.grace_period=1",
    "score.max_actors=1",
    "evaluate.by=skin_tone",  # the sample's metadata.csv: the evaluation reports each tone
]
# 12 epochs of 9 steps (2 workers x 16): with the scratch recipe's identity-initialised residual
# blocks each backbone passes 0.93 validation accuracy by the tenth (at 40 photos a class and 12
# epochs: ResNet50 0.98 and EfficientNetV2S 0.98 with them, 0.73 and 0.52 without; 2026-12-01);
# ResNet50 and EfficientNetV2S at 64 px, InceptionV3 at its smallest input, 75 px.
MEMBERS = [
    MemberSpec(
        backbone,
        settings=(
            f"model.backbone={backbone}",
            f"model.image_size={size}",
            "train.batch_size=16",
            "train.epochs=12",
        ),
        tune=backbone == "resnet50",
    )
    for backbone, size in (("resnet50", 64), ("inception_v3", 75), ("efficientnetv2s", 64))
]
# The tiny-member recipe: the quick demo's members (which the tests share as their trained members
# and bundle) and configs/tiny_smoke.yaml (a test keeps them equal). The scratch recipe, 2 workers
# x 8 images; a high rate, as a small CNN takes it.
TINY_RECIPE = (
    "model.backbone=tiny",
    "model.weights=none",
    "train.workers=2",
    "train.batch_size=8",
    "train.finetune_lr=0.004",
)
# Two tiny CNNs at two sizes: the same stages in a few minutes. A third of the training images
# validate, so that the ensemble calibrates on about 50.
QUICK = [
    MemberSpec(
        f"tiny{size}",
        settings=(*TINY_RECIPE, f"model.image_size={size}", "train.epochs=5", "data.val_fraction=0.3"),
        tune=size == 48,
    )
    for size in (48, 64)
]
QUICK_SEARCH = ["tune.trials=2", "tune.max_epochs=3"]
QUICK_CLASSES, QUICK_PER_CLASS = 4, 40


def run_demo(
    out: str, workers: int = 2, quick: bool = False, port: int = 8000, exit_when_done: bool = False
) -> int:
    from skinray.cluster import connect
    from skinray.data.sample import write_sample
    from skinray.pipeline import run_pipeline

    out_dir = Path(out).resolve()
    archive = out_dir / "archive"
    started = time.perf_counter()
    members = QUICK if quick else MEMBERS
    connect(reserved_cpus=workers)  # sized for training, before any stage starts a smaller one
    classes, per_class = (QUICK_CLASSES, QUICK_PER_CLASS) if quick else (CLASSES, PER_CLASS)
    _stage(f"1/4 sample archive: {classes} DermNet classes x {per_class} photos -> {archive}")
    if not (archive / "train").is_dir():
        write_sample(archive, per_class=per_class, classes=classes, seed=0)

    _stage(
        f"2/4 pipeline: check, head search ({members[0].name}), {len(members)} members x {workers} Ray Train "
        "workers, ensemble, evaluation"
    )
    settings = [*SHARED, *(QUICK_SEARCH if quick else ()), f"train.workers={workers}"]
    report = run_pipeline(str(archive), str(out_dir), members, settings)

    _stage("3/4 bulk scoring of the test split on Ray Data -> Parquet")
    scores = _score(out_dir, archive)

    _stage("4/4 the online endpoint on Ray Serve")
    url = _serve(out_dir, archive, port)
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s "
        f"(test accuracy {report['accuracy']:.3f}, chance {1 / classes:.2f})"
    )
    _where(out_dir, scores, url)
    if exit_when_done:
        return _stop_serving()
    print(f"\nThe endpoint and the dashboard stay up until Ctrl-C. Open the page: {url}/", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return _stop_serving()


def _score(out_dir: Path, archive: Path) -> str:
    from skinray.config import load_config
    from skinray.score import format_summary, score

    output = out_dir / "scores"
    summary = score(
        load_config(overrides=["score.max_actors=1"]),
        str(out_dir / "bundle"),
        str(archive / "test"),
        str(output),
    )
    print(format_summary(summary))
    return str(output)


def _serve(out_dir: Path, archive: Path, port: int) -> str:
    """Starts the endpoint on this cluster and scores one test photo through HTTP; returns its URL."""
    from ray import serve

    from skinray.config import load_config
    from skinray.serve.app import APP_NAME, build_app
    from skinray.serve.command import app_args

    cfg = load_config(overrides=[f"serve.port={port}", "serve.max_replicas=1"])
    serve.start(http_options=cfg.serve.http_options)
    serve.run(build_app(app_args(str(out_dir / "bundle"), cfg)), name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    photo = sorted((archive / "test").rglob("*.jpg"))[0]
    answer = _post(f"{url}/v1/predict", photo.read_bytes())
    print(
        f"POST {url}/v1/predict  {photo.parent.name}/{photo.name} (true class {photo.parent.name}) -> "
        f"{answer['label']} ({answer['confidence']:.2f}{', abstained' if answer['abstained'] else ''}), "
        f"{answer['latency_ms']:.0f} ms"
    )
    if answer.get("differential"):
        print(f"  differential: {', '.join(answer['differential'])}")
    for what, data in FOREIGN.items():
        foreign = _post(f"{url}/v1/predict", data())
        print(
            f"POST {url}/v1/predict  {what}, not skin -> "
            + (
                f"not answered: {foreign['reason']} (out-of-distribution score {foreign['ood_score']:.2f})"
                if foreign["out_of_distribution"]
                else f"{foreign['label']} ({foreign['confidence']:.2f}): not refused"
            )
        )
    return url


def _post(url: str, data: bytes) -> dict:
    kind = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
    request = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def scanned_digit(index: int = 0) -> bytes:
    """A real scan of a handwritten digit (scikit-learn ships 1,797; this one by `index`), upscaled
    to 256 px, as PNG bytes: the wrong page a scanner sends."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[index] * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((256, 256), Image.NEAREST).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def foreign_photo() -> bytes:
    """A real photograph that is not of skin (scikit-learn ships it), as JPEG bytes."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("china.jpg")).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# What the demo sends that is not skin: the endpoint says whether its check refused each.
FOREIGN = {
    "a scanned handwritten digit (scikit-learn's digits)": scanned_digit,
    "a photo of a temple (scikit-learn's china.jpg)": foreign_photo,
}


def _where(out_dir: Path, scores: str, url: str) -> None:
    rows = [
        ("archive", out_dir / "archive"),
        ("data check", out_dir / "check.json"),
        ("head search", out_dir / "tune"),
        ("training runs", out_dir / "runs"),
        ("bundle", out_dir / "bundle"),
        ("evaluation", out_dir / "evaluation" / "report.md"),
        ("scores (Parquet)", Path(scores) / "predictions"),
        ("endpoint", f"{url}/v1/predict"),
        ("upload page", f"{url}/"),
        ("Ray dashboard", f"{_dashboard()} (while this runs)"),
        ("TensorBoard", f"tensorboard --logdir {out_dir / 'runs'}"),
        ("serve it again", f"skinray serve --model {out_dir / 'bundle'}"),
    ]
    print("\nwhere everything is:")
    for name, where in rows:
        print(f"  {name:17s} {where}")


def _dashboard() -> str:
    try:
        import ray

        return f"http://{ray._private.worker._global_node.webui_url}"
    except Exception:  # no dashboard on this cluster
        return "(not running)"


def _stop_serving() -> int:
    from ray import serve

    serve.shutdown()
    return 0


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)
