"""Linear probe as facebookresearch/mae `main_linprobe.py` (which the CL-MAE code copies).

Frozen encoder; head = BatchNorm1d(affine=False, eps=1e-6) then Linear, weight trunc_normal(std=0.01), bias 0;
LARS (MAE `util/lars.py`: momentum 0.9, trust coefficient 0.001, weight decay 0, 1-D parameters exempt);
per-iteration linear warm-up and half-cycle cosine (MAE `lr_sched`). The CL-MAE code uses lr = blr = 0.1 (not
scaled by the batch), 90 epochs, 10 warm-up epochs, batch 512.

Inputs come as global batches of either images (the official protocol: augmented images through the frozen
encoder every step) or cached features (extracted once, un-augmented: fast sweeps). BatchNorm statistics are those
of the whole global batch (the official code uses per-GPU statistics).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from clmae_jax.evaluate.bank import add_counts
from clmae_jax.evaluate.knn import query_slice
from clmae_jax.runtime import optim
from clmae_jax.runtime.state import TrainState


def lars(learning_rate, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
    """MAE's LARS: for matrices, g + wd * w scaled by tc * ||w|| / ||g + wd * w|| (1 when a norm is 0); vectors
    unchanged; then heavy-ball momentum mu = m * mu + g and w -= lr * mu (lr applied after the momentum)."""
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=matrices),
                       optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
                       optax.trace(decay=momentum), optax.scale_by_learning_rate(learning_rate))


class ProbeHead(nn.Module):
    """BatchNorm without affine parameters (eps 1e-6, PyTorch momentum 0.1) then a linear classifier."""

    num_classes: int

    @nn.compact
    def __call__(self, features, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_scale=False, use_bias=False,
                         name="bn")(features.astype(jnp.float32))
        # timm trunc_normal_(std=0.01) cuts at +-2 absolute, i.e. at +-200 standard deviations.
        init = nn.initializers.truncated_normal(0.01, lower=-200.0, upper=200.0)
        return nn.Dense(self.num_classes, kernel_init=init, name="head")(x)


def probe_optimizer(probe_config, steps_per_epoch: int, total_steps: int):
    """(LARS with MAE's schedule, peak lr): lr = probe_config.lr, or base_lr * batch / 256 when lr is 0."""
    peak = optim.learning_rate(probe_config, probe_config.batch_size)
    schedule_config = ml_collections.ConfigDict(dict(schedule="cosine", warmup_epochs=probe_config.warmup_epochs,
                                                     min_lr=probe_config.get("min_lr", 0.0)))
    schedule = optim.schedule(schedule_config, peak, steps_per_epoch, total_steps)
    return lars(schedule, probe_config.get("weight_decay", 0.0)), peak


def init_state(head: ProbeHead, tx, dim: int, seed: int) -> TrainState:
    """Step-0 state: head parameters, LARS state, BatchNorm running statistics."""
    variables = head.init(jax.random.PRNGKey(seed), jnp.zeros((2, dim)), train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], opt_state=tx.init(variables["params"]),
                      model_state=variables["batch_stats"])


def probe_train_step(head: ProbeHead, tx, featurize):
    """jit of (state, encoder params, batch) -> (state, loss); `featurize(params, batch) -> [B, D]` stays frozen."""

    def step(state, encoder_params, batch):
        features = jax.lax.stop_gradient(featurize(encoder_params, batch))

        def loss_fn(params):
            logits, updates = head.apply({"params": params, "batch_stats": state.model_state}, features, train=True,
                                         mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=stats), loss

    return jax.jit(step, donate_argnums=0)


def probe_eval_step(head: ProbeHead):
    """jit of (state, features, labels, valid) -> summed top-1 / top-5 hits and count (invalid rows excluded)."""

    def evaluate(state, features, labels, valid):
        logits = head.apply({"params": state.params, "batch_stats": state.model_state}, features, train=False)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        real = valid.astype(jnp.float32)
        return {"correct": jnp.sum((top5[:, 0] == labels) * real),
                "correct5": jnp.sum(jnp.any(top5 == labels[:, None], axis=1) * real), "count": jnp.sum(real)}

    return jax.jit(evaluate)


def train_head(head: ProbeHead, probe_config, dim: int, steps_per_epoch: int, epoch_batches, featurize,
               encoder_params=None, checkpointer=None, name: str = "linear") -> TrainState:
    """Trains the head for probe_config.epochs; `epoch_batches(epoch)` yields that epoch's global batches.

    With a checkpointer the state is saved after every epoch and a rerun resumes after the last saved epoch.
    """
    total = probe_config.epochs * steps_per_epoch
    tx, peak = probe_optimizer(probe_config, steps_per_epoch, total)
    state = init_state(head, tx, dim, probe_config.get("seed", 0))
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore(state)
        logging.info("%s: resumed at step %d", name, int(state.step))
    step_fn = probe_train_step(head, tx, featurize)
    logging.info("%s: %d epochs x %d steps, batch %d, peak lr %.4g", name, probe_config.epochs, steps_per_epoch,
                 probe_config.batch_size, peak)
    for epoch in range(int(state.step) // steps_per_epoch, probe_config.epochs):
        loss = None
        for batch in epoch_batches(epoch):
            state, loss = step_fn(state, encoder_params, batch)
        if checkpointer is not None:
            checkpointer.save(int(state.step), state, {"epoch": epoch + 1})
        if loss is not None and (epoch + 1) % max(1, probe_config.epochs // 10) == 0:
            logging.info("%s: epoch %d/%d, loss %.4f", name, epoch + 1, probe_config.epochs, float(loss))
    if checkpointer is not None:
        checkpointer.close()
    return state


def probe_accuracy(head: ProbeHead, state: TrainState, test, query_batch: int = 1024) -> dict:
    """{"acc1", "acc5"} in percent of the head on every valid row of a feature bank (sliced as kNN queries are)."""
    evaluate, size = probe_eval_step(head), min(query_batch, test.rows_per_device)
    totals = None
    for start in range(0, test.features.shape[0], size):
        counts = evaluate(state, *query_slice((test.features, test.labels, test.valid), size, jnp.int32(start)))
        totals = counts if totals is None else add_counts(totals, counts)
    totals = jax.device_get(totals)
    return {"acc1": 100 * float(totals["correct"]) / float(totals["count"]),
            "acc5": 100 * float(totals["correct5"]) / float(totals["count"])}


def local_rows(bank) -> tuple[np.ndarray, np.ndarray]:
    """This process's valid (features, labels) of a bank, as numpy."""
    take = lambda a: np.concatenate([np.asarray(s.data) for s in sorted(a.addressable_shards,
                                                                          key=lambda s: s.index[0].start)])
    valid = take(bank.valid) > 0
    return take(bank.features)[valid], take(bank.labels)[valid]


def cached_epochs(features: np.ndarray, labels: np.ndarray, local_batch: int, steps_per_epoch: int, seed: int,
                  to_global):
    """`epoch -> global batches` over process-local cached features, reshuffled each epoch by (seed, epoch)."""

    def epoch_batches(epoch):
        order = np.random.default_rng([seed, epoch, jax.process_index()]).permutation(len(labels))
        for i in range(steps_per_epoch):
            rows = order[i * local_batch:(i + 1) * local_batch]
            yield to_global({"features": features[rows], "label": labels[rows].astype(np.int32)})

    return epoch_batches
