"""The distributed train step, written out (the learning-rate rules are in `schedule.py`).

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585), so the step
is written out: `strategy.run` inside a `tf.function`, with the class-weighted, label-smoothed loss,
loss scaling for mixed_float16 and optional XLA in one place. Keras' optimizer all-reduces the
gradients when applied in a replica context; each replica's loss is divided by the global batch.
"""

from __future__ import annotations


def make_train_step(
    strategy,
    model,
    optimizer,
    class_weights: list[float],
    label_smoothing: float,
    global_batch: int,
    xla: bool = False,
):
    """The distributed train step: (images, labels, valid) per replica -> (global mean loss, predictions).

    Per example: label-smoothed cross-entropy times the class weight times `valid` (0 for a file
    that failed to decode), summed and divided by the global batch, so that Keras' all-reduce
    (SUM) of the gradients gives the mean over all workers. The L2 penalty is split across
    replicas the same way. With mixed_float16 the optimizer is a LossScaleOptimizer: `scale_loss`
    scales up and `apply_gradients` unscales and skips non-finite steps. With `xla`, the forward and
    backward pass are compiled; the all-reduce stays outside the XLA cluster.
    """
    import keras
    import tensorflow as tf

    weights_by_class = tf.constant(class_weights, tf.float32)
    num_classes = len(class_weights)

    def forward_backward(images, labels, valid):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            targets = (
                tf.one_hot(labels, num_classes) * (1.0 - label_smoothing) + label_smoothing / num_classes
            )
            per_example = keras.losses.categorical_crossentropy(targets, logits, from_logits=True)
            weights = tf.gather(weights_by_class, labels) * valid
            loss = tf.reduce_sum(per_example * weights) / global_batch
            if model.losses:
                loss += tf.add_n(model.losses) / strategy.num_replicas_in_sync
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        return loss, grads, tf.argmax(logits, axis=-1, output_type=tf.int32)

    if xla:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels, valid):
        loss, grads, predictions = forward_backward(images, labels, valid)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, predictions

    @tf.function
    def step(images, labels, valid):
        loss, predictions = strategy.run(replica_step, args=(images, labels, valid))
        return strategy.reduce("SUM", loss, axis=None), predictions

    return step
