"""Joining the Ray cluster, or starting a local one sized for the work.

Every stage that runs on Ray connects through here once its inputs are known good (so a mistake
fails before any cluster starts): to the cluster in RAY_ADDRESS or one started with `ray start`,
else to a new local cluster sized for what the stage reserves (`reserved_cpus`: the one rule).
"""

from __future__ import annotations

import math
import os

from skinray import UserError


def reserved_cpus(cfg, command: str) -> float:
    """The CPUs a command's long-lived workers hold for its whole run (what `connect` keeps free of)."""
    train = cfg.train.workers * cfg.train.cpus_per_worker
    actors = cfg.score.max_actors * cfg.score.cpus_per_actor
    return {
        "train": train,
        "tune": actors if cfg.tune.mode == "cached" else train,  # the embedding job's model actors
        "score": actors + 1,  # and the actor of Ray Data's checkpoint filter
        "evaluate": actors,
        "ensemble": actors,
        "pipeline": max(train, actors),
    }.get(command, 0.0)


def connect(reserved_cpus: float = 0.0, running_only: str | None = None) -> bool:
    """Connects once per process; refuses a cluster whose CPUs long-lived workers would all take.
    Returns True when it started a local cluster (which ends with this process). With
    `running_only`, no local cluster is started: that message is the error instead.

    `reserved_cpus` is what the stage's long-lived workers hold for their whole run (training
    workers; scoring's model actors). Those CPUs are not available to ingest, so a cluster with
    none left over would wait forever for its first batch. A local cluster on a small machine gets
    enough logical CPUs for them plus two ingest tasks (they then share the physical cores).
    """
    import ray

    from skinray.console import announce_log_folder, quiet_process, ray_init_options, worker_options

    started = False
    if not ray.is_initialized():
        quiet_process()  # before the local cluster starts: its workers inherit the environment
        address = os.environ.get("RAY_ADDRESS", "auto")  # "local": always a new local cluster
        if address != "local":
            try:
                ray.init(address=address, **ray_init_options(), **worker_options())
            except ConnectionError:
                address = "local"
        if address == "local" and running_only:
            raise UserError(running_only)
        if address == "local":
            ray.init(
                num_cpus=max(os.cpu_count() or 1, math.ceil(reserved_cpus) + 2),
                **ray_init_options(),
                **worker_options(),
            )
            started = True
        import ray.data  # noqa: F401  (configures its console handler, which quiet_process lowers)

        quiet_process()
        announce_log_folder()
    total = ray.cluster_resources().get("CPU", 0)
    if reserved_cpus and total - reserved_cpus < 1:
        raise UserError(
            f"the Ray cluster has {total:g} CPUs and the stage's workers take {reserved_cpus:g}: "
            "none is left for ingest. Add CPUs, or lower train.workers / train.cpus_per_worker "
            "(training) or score.max_actors / score.cpus_per_actor (scoring)."
        )
    return started
