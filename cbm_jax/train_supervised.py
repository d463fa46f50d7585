"""Supervised training with Curriculum by Masking (Jarca et al., 2024), one jitted update step over the mesh.

Every training image loses k of its n x n grid cells, sampled without replacement in proportion to their Sobel
salience and set to 0 in normalised space (MaskIn, the official model's first layer); k follows a per-epoch
schedule; evaluation never masks. Salience is computed per batch on device from the un-normalised pixels, so it
always matches the augmented image (the official code precomputes it once per image, without augmentation,
which is the same thing when `config.input.augment="none"`, the paper configs' setting).
"""
import contextlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from cbm_jax import pretrained
from cbm_jax.classification import ClassificationEvaluator, accuracy_step
from cbm_jax.masking import mask_images, num_masked_patches, sample_patches, uniform_probs
from cbm_jax.mixup import mix
from cbm_jax.models.cvt import CVT_13, CvT
from cbm_jax.models.resnet import ResNet
from cbm_jax.models.wide_resnet import WRN_52_2, WideResNet
from cbm_jax.salience import patch_salience
from cbm_jax.schedules import masking_schedule
from clmae_jax.models.vit import ViTClassifier, vit_size
from clmae_jax.runtime import checkpoint, data, loop, metrics, optim
from clmae_jax.runtime.experiment import Experiment
from clmae_jax.runtime.errors import MissingInputError, UserError, check_choice
from clmae_jax.runtime.state import TrainState, tree_size

MODELS = ("resnet18", "wrn_52_2", "cvt13", "vit")
SALIENCE = ("sobel", "uniform")  # uniform: random masking, the ablation.
OPTIONS = {"model.name": MODELS, "cbm.salience": SALIENCE}  # For validate.check_config.


def build_classifier(config, num_classes: int) -> flax.linen.Module:
    """The classifier named by config.model.name."""
    m, dtype = config.model, jnp.dtype(config.model.dtype)
    check_choice("model.name", m.name, MODELS)
    if m.name == "resnet18":
        return ResNet(num_classes, width=m.width, dtype=dtype)
    if m.name == "wrn_52_2":
        return WideResNet(num_classes, **WRN_52_2, dtype=dtype)
    if m.name == "cvt13":
        return CvT(num_classes, **CVT_13, dtype=dtype)
    return ViTClassifier(num_classes, patch_size=m.patch_size, **vit_size(m.size), pool=m.pool, dtype=dtype,
                         drop_path=m.drop_path, head_init_std=m.head_init_std, pos_embed=m.pos_embed,
                         attention=m.attention, remat=m.remat)


def init_variables(model, config, num_classes: int) -> dict:
    """{'params', 'batch_stats'?}: random, or with the pretrained weights config.model.init_from names."""
    path, name = config.model.get("init_from"), config.model.name
    if path and name == "cvt13":  # The file's existence is checked with the config (validate.check_weights).
        from cbm_jax.interop.cvt_torch import load_cvt_torch_checkpoint
        return load_cvt_torch_checkpoint(path, num_classes, seed=config.seed)
    if path and name != "vit":
        raise UserError(f"config.model.init_from loads PyTorch CvT-13 weights (model.name='cvt13') or a pretrained "
                        f"MAE / CL-MAE encoder (model.name='vit'), not {name!r}; clear it or change the model.")
    shape = (1, config.input.image_size, config.input.image_size, config.input.channels)
    rng = jax.random.PRNGKey(config.seed)
    variables = jax.jit(model.init, static_argnames="train")({"params": rng, "dropout": rng}, jnp.zeros(shape),
                                                              train=False)
    return pretrained.with_pretrained_weights(variables, config, path) if path else variables


def masking_ratios(config, num_epochs: int) -> np.ndarray:
    """Masking ratio of every 0-based epoch, from config.cbm's schedule (preset '' to use r_min / r_max)."""
    c = config.cbm
    return masking_schedule(c.schedule, num_epochs, c.get("r_min"), c.get("r_max"), c.get("preset") or None)


def cell_probabilities(config, images):
    """Per-image cell distribution [B, grid^2]: Sobel salience of the uint8 images, or uniform (random masking)."""
    c = config.cbm
    if check_choice("cbm.salience", c.salience, SALIENCE) == "uniform":
        return uniform_probs(images.shape[0], c.grid**2)
    pixels = images.astype(jnp.float32)
    if c.salience_size and c.salience_size != images.shape[1]:
        # The official code measures CIFAR salience on a 64 px resize (PIL bicubic) of the 32 px image.
        pixels = jax.image.resize(pixels, (pixels.shape[0], c.salience_size, c.salience_size, pixels.shape[3]),
                                  "bicubic")
    return patch_salience(pixels, c.grid)


def masked_inputs(config, images, rng, num_masked: int):
    """Normalised uint8 `images` with `num_masked` cells of each set to 0, drawn in proportion to salience."""
    normalized = data.normalize(images, config.input.mean, config.input.std)
    if num_masked == 0:  # The official MaskIn is the identity at ratio 0: no salience is computed.
        return normalized
    cells = sample_patches(rng, cell_probabilities(config, images), num_masked)
    return mask_images(normalized, cells, config.cbm.grid)


def classification_loss(logits, labels, targets):
    """Cross-entropy with integer labels, or with the soft targets of label smoothing / mixup when given."""
    if targets is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(model, tx, lr_schedule, config, num_classes: int = 0):
    """state, batch, num_masked -> state, measurements; num_masked is static (one compilation per mask count).

    With config.mix (label smoothing, mixup / cutmix; `num_classes` needed) the loss uses soft targets.
    """
    base_rng = jax.random.PRNGKey(config.seed)
    mix_config = config.get("mix")
    soft = mix_config is not None and (mix_config.label_smoothing > 0 or mix_config.mixup_alpha > 0
                                       or mix_config.cutmix_alpha > 0)

    def train_step(state: TrainState, batch, num_masked: int):
        step_rng = jax.random.fold_in(base_rng, state.step)

        def loss_and_grad(params, micro, rng):
            mask_rng, dropout_rng = jax.random.split(rng)
            images = masked_inputs(config, micro["image"], mask_rng, num_masked)
            targets = None
            if soft:  # A key of its own, so runs without mixing keep their random streams.
                images, targets = mix(jax.random.fold_in(rng, 2), images, micro["label"], num_classes, mix_config)

            def loss_fn(p):
                logits, new_model_state = model.apply({"params": p, **state.model_state}, images, train=True,
                                                      rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
                loss = classification_loss(logits, micro["label"], targets)
                return loss, (new_model_state, jnp.mean(logits.argmax(-1) == micro["label"]))

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        # Micro-batches average their BatchNorm running statistics; BN statistics are always over the global
        # (micro-)batch: jit with a sharded batch reduces them across devices, i.e. synchronised BatchNorm.
        (loss, (model_state, accuracy)), grads = loop.accumulate_gradients(
            loss_and_grad, state.params, batch, step_rng, config.grad_accum_steps, config.get("mesh"))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        measurements = {"loss": loss, "train_accuracy": accuracy, "learning_rate": lr_schedule(state.step),
                        **loop.norms(grads, params, updates)}
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
        return new_state, measurements

    return train_step


def make_eval_step(model, config):
    """state, batch -> summed correct predictions, loss and real examples (padding excluded); never masks."""
    apply_logits = lambda state, images: model.apply({"params": state.params, **state.model_state}, images,
                                                     train=False)
    return accuracy_step(apply_logits, config)


def masking_grids(config, images, rng, num_masked: int) -> dict:
    """Pictures of uint8 `images`: original | salience of each cell (white = most likely masked) | masked input."""
    probs, masked = cell_probabilities(config, images), masked_inputs(config, images, rng, num_masked)
    heat = metrics.heat_map(probs / probs.max(axis=1, keepdims=True), images.shape[1], images.shape[-1])
    std, mean = np.asarray(config.input.std), np.asarray(config.input.mean)
    columns = [np.asarray(images, np.float32) / 255.0, heat, np.asarray(masked) * std + mean]
    return {"cbm_masks": metrics.image_grid(columns, ("original", "salience", "masked input"))}


def fresh_state(variables: dict, tx) -> TrainState:
    """Step 0 of model `variables`: params are trained, every other collection (batch_stats) is model state."""
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=model_state)


class Supervised(Experiment):
    """Supervised training with the CBM masking curriculum (schedule 'none': plain training)."""

    summary_split = "train"  # The pictures show training images, as masked during training.

    def __init__(self, config, mesh, budget):
        super().__init__(config, mesh, budget)
        self.model = build_classifier(config, budget.num_classes)
        self.lr, lr_schedule = budget.learning_rate()
        self.tx = optim.make_optimizer(config.optimizer, lr_schedule)
        if config.optimizer.get("layer_decay", 1.0) < 1.0:  # MAE fine-tuning: lower lr for earlier ViT blocks.
            params = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), jnp.zeros(self.input_shape()))["params"]
            depth = vit_size(config.model.size)["depth"]
            self.tx = optax.chain(self.tx, optim.layer_decay(params, depth, config.optimizer.layer_decay))
        self.ratios = masking_ratios(config, budget.num_epochs)
        self.num_cells = config.cbm.grid**2
        self.patches = [num_masked_patches(r, self.num_cells) for r in self.ratios]
        logging.info("CBM %s/%s masking, cells masked per epoch: %s", config.cbm.schedule, config.cbm.salience,
                     self.patches)
        step = make_train_step(self.model, self.tx, lr_schedule, config, budget.num_classes)
        self.step_fn = self.compile_step(step, static_argnums=2)

    def input_shape(self) -> tuple:
        """Shape of a one-image batch."""
        return (1, self.config.input.image_size, self.config.input.image_size, self.config.input.channels)

    def init_state(self, rng):
        """Random weights (as `init_variables` draws them) and a fresh optimizer state."""
        variables = self.model.init({"params": rng, "dropout": rng}, jnp.zeros(self.input_shape()), train=False)
        return fresh_state(variables, self.tx)

    def create_train_state(self):
        """Random weights, or the pretrained weights named by config.model.init_from."""
        if not self.config.model.get("init_from"):
            return super().create_train_state()
        variables = init_variables(self.model, self.config, self.budget.num_classes)
        return jax.jit(lambda v: fresh_state(v, self.tx), out_shardings=self.state_sharding)(variables)

    def describe(self, state) -> str:
        """Model name, size and learning rate."""
        return f"{self.config.model.name} with {tree_size(state.params) / 1e6:.2f}M parameters, lr {self.lr:.3g}"

    def train_step(self, state, batch, step: int):
        """One update with this epoch's number of masked cells (one compilation per distinct count)."""
        return self.step_fn(state, batch, self.patches[self.budget.epoch(step - 1)])

    def summaries(self, state, step: int) -> dict:
        """Salience maps and masked inputs of the fixed training images at this epoch's masking ratio."""
        num_masked = self.patches[self.budget.epoch(step - 1)]
        return masking_grids(self.config, self.summary_images, jax.random.PRNGKey(step), num_masked)

    def make_evaluator(self, name: str, eval_config):
        """config.evals.<name>: classification accuracy on a split (the test split once per epoch by default)."""
        if eval_config.type != "classification":
            raise UserError(f"config.evals.{name}.type={eval_config.type!r} is not an evaluator of supervised "
                            "training; use 'classification'.")
        eval_step = make_eval_step(self.model, self.config)
        return ClassificationEvaluator(name, eval_config, self.config, self.mesh, eval_step)

    def eval_scalars(self, step: int) -> dict:
        """The masking curriculum of the epoch just evaluated."""
        epoch = self.budget.epoch(step - 1)
        return {"masking_ratio": self.ratios[epoch], "masked_patches": self.patches[epoch],
                "masked_fraction": self.patches[epoch] / self.num_cells}


@contextlib.contextmanager
def restored(config, workdir: str):
    """(run, experiment, state, test-split evaluator) of the latest checkpoint in `workdir`; closes the run after."""
    checkpoints = checkpoint.checkpoints_directory(workdir)
    if not checkpoint.committed_steps(checkpoints):  # Before any writer or checkpointer thread exists.
        raise MissingInputError(f"No checkpoint in {checkpoints}; point --workdir at a CBM training run of this "
                                "config.")
    run = loop.Run.create(config, workdir)
    try:
        experiment = Supervised(config, run.mesh, run.budget)
        state, _ = run.restore_or(experiment)
        yield run, experiment, state, ClassificationEvaluator("test", ml_collections.ConfigDict(), config, run.mesh,
                                                              make_eval_step(experiment.model, config))
    finally:
        run.close()  # Also on errors: an open checkpointer at interpreter exit crashes in its threads.


def evaluate_checkpoint(config, workdir: str) -> dict:
    """Test accuracy and loss of the latest checkpoint in `workdir`, unmasked; also written to eval_results.json."""
    with restored(config, workdir) as (_, _, state, evaluator):
        test = {**evaluator.run(state), "step": int(state.step)}
    logging.info("checkpoint at step %d: test accuracy %.4f, loss %.4f on %d images", test["step"],
                 test["test_accuracy"], test["test_loss"], test["test_examples"])
    metrics.write_json(workdir, "eval_results.json", test)
    return test


def train_and_evaluate(config, workdir: str):
    """Trains a classifier with CBM as config says, evaluating as config.evals says; resumes from `workdir`."""
    return loop.train(config, workdir, Supervised)
