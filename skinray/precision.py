"""Inference precision: float32, or bfloat16 where the hardware executes it natively.

`score.precision` and `serve.precision` take `float32`, `bfloat16` or `auto` (bfloat16 where the
device has it: a CPU flag `avx512_bf16` or `amx_bf16`, or a GPU of compute capability 8.0 or
newer; float32 elsewhere). A loaded `.keras` model keeps the float32 policies it was saved with,
so it is rebuilt from its config under Keras' `mixed_bfloat16` policy (variables stay float32,
computation runs in bfloat16) and given its weights; the `logits` layer stays float32, so logits,
and everything fitted on them (temperatures, weights, thresholds, sets), stay float32.
"""

from __future__ import annotations

from pathlib import Path

from skinray import UserError
from skinray.config import PRECISIONS

KEEP_FLOAT32 = ("logits",)  # layers left in float32 under bfloat16
CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bfloat16() -> str:
    """Where bfloat16 runs natively here ("CPU avx512_bf16", "GPU compute capability 8.6"), or ""."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) >= (8, 0):
            return f"GPU compute capability {capability[0]}.{capability[1]}"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return ""
    found = [flag for flag in CPU_FLAGS if flag in flags]
    return f"CPU {', '.join(found)}" if found else ""


def resolve(precision: str) -> tuple[str, str]:
    """(the precision to run in, why): `auto` becomes bfloat16 where it is native, else float32."""
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}': must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "as configured"
    native = native_bfloat16()
    return ("bfloat16", f"auto: {native}") if native else ("float32", "auto: no native bfloat16 here")


def in_precision(model, precision: str):
    """`model` as it computes in `precision`: itself for float32; for bfloat16, a copy rebuilt
    under `mixed_bfloat16` (but its KEEP_FLOAT32 layers) with the same weights."""
    if precision == "float32":
        return model
    config = model.get_config()
    _set_policies(config, "mixed_bfloat16")
    import skinray.models.classifier  # noqa: F401  registers the custom layers

    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _set_policies(node, policy: str, keep: bool = False) -> None:
    """Every float32 DTypePolicy in a (nested) Keras config set to `policy`, except inside the
    KEEP_FLOAT32 layers."""
    if isinstance(node, list):
        for item in node:
            _set_policies(item, policy, keep)
        return
    if not isinstance(node, dict):
        return
    keep = keep or node.get("name") in KEEP_FLOAT32 or node.get("config", {}).get("name") in KEEP_FLOAT32
    if node.get("class_name") == "DTypePolicy" and not keep:
        if node.get("config", {}).get("name") == "float32":
            node["config"]["name"] = policy
        return
    for value in node.values():
        _set_policies(value, policy, keep)
