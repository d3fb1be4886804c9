"""Joining the Ray cluster, or starting a local one sized for the work.

Every command that runs on Ray (data check, train, evaluate, the demo) connects through here:
to the cluster in RAY_ADDRESS or one started with `ray start`, else to a new local cluster.
"""

from __future__ import annotations

import os

from skinray import UserError


def connect(training_cpus: float = 0.0) -> None:
    """Connects once per process; refuses a cluster whose CPUs the training workers would all take.

    The training workers' CPUs are not available to ingest, so a cluster with none left over
    would wait forever for its first batch. A local cluster on a small machine gets enough logical
    CPUs for the workers plus two ingest tasks (they then share the physical cores).
    """
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
        except ConnectionError:
            ray.init(num_cpus=max(os.cpu_count() or 1, int(training_cpus) + 2))
    total = ray.cluster_resources().get("CPU", 0)
    if training_cpus and total - training_cpus < 1:
        raise UserError(f"the Ray cluster has {total:g} CPUs and the training workers take {training_cpus:g}: "
                        "none is left for ingest. Add CPUs, or lower train.workers or train.cpus_per_worker.")
