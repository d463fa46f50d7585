"""Test-set classification accuracy: the evaluator of supervised training and fine-tuning."""
import jax
import jax.numpy as jnp
import optax

from clmae_jax.runtime import data, mesh as mesh_lib


def accuracy_step(apply_logits, config):
    """(state, batch) -> summed correct predictions, loss and real examples (padding excluded).

    `apply_logits(state, normalized_images) -> logits`.
    """

    def eval_step(state, batch):
        logits = apply_logits(state, data.normalize(batch["image"], config.input.mean, config.input.std))
        real = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return {"correct": jnp.sum((logits.argmax(-1) == batch["label"]) * real), "loss": jnp.sum(loss * real),
                "count": jnp.sum(real)}

    return eval_step


@jax.jit
def add_sums(totals: dict, sums: dict) -> dict:
    """Running totals of eval_step's sums."""
    return jax.tree.map(jnp.add, totals, sums)


class ClassificationEvaluator:
    """Accuracy and loss over a whole split; every process runs the same number of batches."""

    def __init__(self, name: str, eval_config, config, mesh, eval_step):
        self.name, self.every_steps, self.best_key = name, eval_config.get("every_steps", 0), f"{name}_accuracy"
        self.config, self.mesh, self.eval_step = config, mesh, jax.jit(eval_step)
        self.source = data.load_source(config.input, eval_config.get("split") or config.input.eval_split)

    def run(self, state) -> dict:
        """{name}_accuracy, {name}_loss and {name}_examples of `state` on the split."""
        local = mesh_lib.local_batch_size(self.config.eval_batch_size)
        iterator, _ = data.eval_iterator(self.config.input, self.source, local)
        totals = None
        for batch in mesh_lib.prefetch_to_mesh(iterator, self.mesh):
            sums = self.eval_step(state, batch)
            totals = sums if totals is None else add_sums(totals, sums)  # On the device: no sync per batch.
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        return {f"{self.name}_accuracy": totals["correct"] / totals["count"],
                f"{self.name}_loss": totals["loss"] / totals["count"], f"{self.name}_examples": totals["count"]}
