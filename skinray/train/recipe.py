"""Which training recipe a run follows, in words, and the settings that contradict its weights.

The recipes themselves are configuration (`skinray.config.RECIPES`): 'transfer' for pretrained
weights (a head on a frozen backbone, then the top layers at a small rate), 'scratch' for
`weights: none` (one phase, every layer trainable, a from-scratch rate with warm-up and cosine
decay). The driver prints `describe()` and every `contradictions()` line before the first epoch.
"""

from __future__ import annotations

from skinray.config import Config, recipe_for
from skinray.train.schedule import scaled_learning_rate

FINETUNE_RATE = 3e-4  # below this, a rate nudges pretrained weights; it does not train random ones


def describe(cfg: Config, global_batch: int) -> str:
    """One paragraph: the recipe, why it was chosen, and the values that shape it."""
    model, train = cfg.model, cfg.train
    chosen = train.recipe != recipe_for(model.weights)
    why = "named by train.recipe" if chosen else f"model.weights is '{model.weights}'"

    def rate(lr: float) -> str:
        scaled = scaled_learning_rate(lr, global_batch, train.base_batch, train.lr_scaling)
        return f"{lr:.0e} per {train.base_batch} images = {scaled:.1e} at global batch {global_batch}"

    layers = "every layer" if train.unfreeze_top < 0 else f"the top {train.unfreeze_top} backbone layers"
    phases = (
        f"{train.head_epochs} head epochs on a frozen backbone at {rate(train.head_lr)}, then "
        if train.head_epochs
        else "one phase, "
    )
    schedule = (
        f"{train.warmup_epochs} warm-up epochs then cosine decay to {train.min_lr:.0e}"
        if train.schedule == "cosine"
        else f"{train.warmup_epochs} warm-up epochs, then x{train.plateau_factor} after "
        f"{train.plateau_patience} epochs without improvement"
    )
    return (
        f"recipe {train.recipe} ({why}): {phases}{layers} at {rate(train.finetune_lr)}; {schedule}; "
        + (
            "residual blocks start as the identity; "
            if model.zero_init_residual and model.weights == "none"
            else ""
        )
        + f"dropout {model.dropout:.3g}/{model.head_dropout:.3g}, "
        f"label smoothing {train.label_smoothing:.3g}, "
        f"early stopping after {train.early_stopping_patience or 'never'} epochs without improvement"
    )


def contradictions(cfg: Config) -> list[str]:
    """Settings that work against the run's weights, each naming the settings and what to do."""
    model, train = cfg.model, cfg.train
    found = []
    if model.weights == "none":
        random = "the backbone starts from random weights (model.weights none)"
        if train.head_epochs:
            found.append(
                f"train.head_epochs={train.head_epochs} trains the head on a frozen backbone, but "
                f"{random}: those epochs teach the backbone nothing. The scratch recipe uses 0."
            )
        if train.unfreeze_top >= 0:
            found.append(
                f"train.unfreeze_top={train.unfreeze_top} trains only the top layers, but {random}: "
                "lower layers keep their random weights. The scratch recipe uses -1 (all)."
            )
        if train.finetune_lr < FINETUNE_RATE:
            found.append(
                f"train.finetune_lr={train.finetune_lr:g} is a fine-tuning rate, but {random}. "
                "The scratch recipe uses 1e-3."
            )
    elif train.recipe == "scratch":
        found.append(
            f"train.recipe=scratch with model.weights={model.weights}: every layer trains at a "
            "from-scratch rate from the first epoch, which overwrites much of what pretrained "
            "weights hold. The transfer recipe (the default for pretrained weights) keeps it."
        )
    return found
