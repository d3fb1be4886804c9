"""`skinray serve`: the endpoint in the foreground, and the Serve config file that deploys the same.

    skinray serve --model BUNDLE [--host 127.0.0.1] [--port 8000] [--config FILE] [--set serve.K=V ...]
    skinray serve --model BUNDLE --print-config > serve.yaml     # then: serve deploy serve.yaml

Joins the Ray cluster in RAY_ADDRESS (or `ray start`'s), else starts a local one. Ctrl-C or
SIGTERM removes the application; a local cluster this command started is shut down with Serve.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import yaml

from skinray import UserError
from skinray.serve.app import APP_NAME, build_app, serve_section
from skinray.storage import absolute, redact


def app_args(model: str, cfg) -> dict:
    """The application's arguments, which Serve stores (its config, the controller's checkpoint) and
    shows: a model or log URI carrying credentials is refused rather than stored there."""
    for what, uri in (("model", model), ("serve.prediction_log", cfg.serve.prediction_log)):
        if redact(uri) != uri:
            raise UserError(
                f"the {what} URI carries credentials ({redact(uri)}), which Serve would store in the "
                "application's config: give them to the cluster instead (an instance role, or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment)"
            )
    serve = dataclasses.asdict(cfg.serve)
    if cfg.serve.prediction_log:
        serve["prediction_log"] = absolute(cfg.serve.prediction_log)  # replicas write from their own folders
    return {"model": absolute(model), "serve": serve}


def serve_config_file(args: dict) -> str:
    """A Serve config file (for `serve deploy` or a RayService's serveConfigV2) of this application."""
    s = args["serve"]
    document = {
        "proxy_location": "EveryNode",
        "http_options": serve_section(s).http_options,
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "skinray.serve.app:build_app",
                "args": args,
            }
        ],
    }
    return (
        "# skinray's online endpoint as a Ray Serve application.\n"
        "#   serve deploy THIS_FILE            (with the dashboard reachable: `ray dashboard cluster.yaml`)\n"
        "# The model path must be readable from every node (shared storage or an object store URI).\n"
        "# API keys: SKINRAY_API_KEYS (comma separated) or serve.api_keys_file, read where the\n"
        "# application is built (the cluster), never written here.\n"
        + yaml.safe_dump(document, sort_keys=False)
    )


def serve_command(cfg, model: str, print_config: bool = False, detach: bool = False) -> int:
    """`skinray serve`: prints the Serve config, deploys and returns (`detach`), or serves in the
    foreground until SIGINT or SIGTERM. Connects to Ray itself, once the application is built."""
    arguments = app_args(model, cfg)
    if print_config:
        print(serve_config_file(arguments), end="")
        return 0
    application = build_app(arguments)  # a bad model path or keys file fails here, before Ray starts
    from ray import serve

    from skinray.cluster import connect

    if detach:
        connect(running_only=NO_CLUSTER_TO_DETACH_ONTO)
        return _deploy(application, cfg, arguments)
    started = connect()
    # After Ray's start-up, which installs its own SIGTERM handler (one that aborts). SIGINT too: a
    # background job starts with it ignored.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    try:
        serve.start(http_options=cfg.serve.http_options)
        serve.run(application, name=APP_NAME, route_prefix="/")
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        api = f"{url}/docs" if cfg.serve.docs else f"{url}/v1"
        print(
            f"skinray serve: {arguments['model']} at {url} (page {url}/, API {api}); Ctrl-C stops it",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("skinray serve: stopping", flush=True)
    finally:
        _stop(started)
    return 0


NO_CLUSTER_TO_DETACH_ONTO = (
    "--detach deploys onto a running cluster, and none was found: set RAY_ADDRESS "
    "(or run `ray start --head`), or leave --detach out to serve in the foreground"
)


def _deploy(application, cfg, arguments: dict) -> int:
    """Deploys (or updates) the application on the cluster and returns; Serve keeps it running."""
    from ray import serve

    serve.start(http_options=cfg.serve.http_options)
    serve.run(application, name=APP_NAME, route_prefix="/")  # returns once every replica is up
    print(
        f"skinray serve: {arguments['model']} deployed as Serve application '{APP_NAME}' "
        f"on port {cfg.serve.port} of every node ({cfg.serve.host}); `serve status` shows it",
        flush=True,
    )
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop(started_cluster: bool) -> None:
    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if started_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
