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
    """`model` ready for inference in `precision`: a copy rebuilt from its config with the same
    weights, each BatchNormalization that follows a convolution folded into it (`fold_batch_norms`),
    and for bfloat16 under `mixed_bfloat16` (but its KEEP_FLOAT32 layers). Itself when there is
    nothing to change (float32 and nothing to fold). For inference only: a folded model trains
    differently (its BatchNormalizations are gone)."""
    config = model.get_config()
    folded = fold_batch_norms(config)
    if precision == "float32" and not folded:
        return model
    if precision != "float32":
        _set_policies(config, "mixed_bfloat16")
    import skinray.models.classifier  # noqa: F401  registers the custom layers

    rebuilt = model.__class__.from_config(config)
    _copy_weights(model, rebuilt, folded)
    return rebuilt


# === BatchNormalization folded into the convolution before it ===
#
# At inference a BatchNormalization is a per-channel scale and shift, which the convolution before
# it can apply itself: kernel x scale, (bias - mean) x scale + beta. That saves a pass over the
# activations in float32; under a bfloat16 policy it saves more, since Keras computes every
# BatchNormalization in float32, casting the activations up and back around it (docs/benchmarks.md
# has the figures). Only a convolution whose one output feeds that BatchNormalization alone, with
# no activation of its own, is folded; the rest stay as they are.

FOLDABLE = ("Conv2D", "DepthwiseConv2D")


def fold_batch_norms(config: dict) -> dict[str, str]:
    """Rewrites a (nested) functional model config in place: each foldable BatchNormalization is
    removed and its convolution given a bias; returns {BatchNormalization name: convolution name}."""
    folded: dict[str, str] = {}
    _fold(config, folded)
    return folded


def _fold(config: dict, folded: dict[str, str]) -> None:
    layers = config.get("layers")
    if not isinstance(layers, list):
        return
    for layer in layers:
        if layer.get("class_name") == "Functional":
            _fold(layer["config"], folded)
    by_name = {layer["name"]: layer for layer in layers}
    uses: dict[str, int] = {}
    for layer in layers:
        for name in _history(layer.get("inbound_nodes", [])):
            uses[name] = uses.get(name, 0) + 1
    for name in _history(config.get("output_layers", [])):
        uses[name] = uses.get(name, 0) + 1
    renamed: dict[str, str] = {}
    for layer in list(layers):
        conv = _foldable_input(layer, by_name, uses)
        if conv is None:
            continue
        conv["config"]["use_bias"] = True
        layers.remove(layer)
        renamed[layer["name"]] = conv["name"]
        folded[layer["name"]] = conv["name"]
    if renamed:
        _rename(layers, renamed)
        if config.get("output_layers"):
            config["output_layers"] = _renamed_outputs(config["output_layers"], renamed)


def _foldable_input(layer: dict, by_name: dict, uses: dict) -> dict | None:
    """The convolution `layer` (a BatchNormalization) can be folded into, or None."""
    if layer.get("class_name") != "BatchNormalization" or len(layer.get("inbound_nodes", [])) != 1:
        return None
    if layer["config"].get("axis") not in (-1, 3, [-1], [3]):
        return None
    sources = _history(layer["inbound_nodes"])
    if len(sources) != 1:
        return None
    conv = by_name.get(sources[0])
    if conv is None or conv.get("class_name") not in FOLDABLE or uses.get(conv["name"]) != 1:
        return None
    if len(conv.get("inbound_nodes", [])) != 1 or conv["config"].get("activation") not in ("linear", None):
        return None
    return conv


def _history(node) -> list[str]:
    """The layer names a config's inbound nodes (or its `output_layers`: [name, node, index], or a
    list of them) read from (`keras_history`), in order."""
    if isinstance(node, (list, tuple)):
        if _is_entry(node):
            return [node[0]]
        return [name for item in node for name in _history(item)]
    if not isinstance(node, dict):
        return []
    if "keras_history" in node:
        return [node["keras_history"][0]]
    return [name for value in node.values() for name in _history(value)]


def _is_entry(node) -> bool:
    """[layer name, node index, tensor index]: how a config names a layer's output."""
    return len(node) == 3 and isinstance(node[0], str) and isinstance(node[1], int)


def _rename(node, renamed: dict[str, str]) -> None:
    """Every `keras_history` under `node` that names a key of `renamed` names its value instead."""
    if isinstance(node, (list, tuple)):
        for item in node:
            _rename(item, renamed)
    elif isinstance(node, dict):
        if "keras_history" in node:
            history = node["keras_history"]
            node["keras_history"] = [renamed.get(history[0], history[0]), *history[1:]]
        for value in node.values():
            _rename(value, renamed)


def _renamed_outputs(outputs, renamed: dict[str, str]):
    if _is_entry(outputs):
        return [renamed.get(outputs[0], outputs[0]), *outputs[1:]]
    return [_renamed_outputs(entry, renamed) for entry in outputs]


def _copy_weights(source, target, folded: dict[str, str]) -> None:
    """Each layer of `target` gets the weights of `source`'s layer of its name; a convolution that a
    BatchNormalization was folded into gets the folded kernel and bias."""
    import numpy as np

    into = {conv: bn for bn, conv in folded.items()}
    for layer in target.layers:
        original = source.get_layer(layer.name)
        if hasattr(layer, "layers") and hasattr(original, "layers"):
            _copy_weights(original, layer, folded)
        elif layer.name in into:
            bn = source.get_layer(into[layer.name])
            kernel = np.asarray(original.kernel)
            bias = np.asarray(original.bias) if original.use_bias else 0.0
            mean, variance = np.asarray(bn.moving_mean), np.asarray(bn.moving_variance)
            scale = 1 / np.sqrt(variance + bn.epsilon)
            if bn.scale:
                scale = scale * np.asarray(bn.gamma)
            shift = np.asarray(bn.beta) if bn.center else 0.0
            if layer.__class__.__name__ == "DepthwiseConv2D":  # (kh, kw, in, multiplier)
                folded_kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
            else:  # (kh, kw, in, out)
                folded_kernel = kernel * scale
            layer.set_weights([folded_kernel, (bias - mean) * scale + shift])
        else:
            layer.set_weights(original.get_weights())


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
