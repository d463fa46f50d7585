"""Feature extraction (the evaluations' forward pass) against the MAE training step on the same ViT, side by side.

    python -m bench.bench_extract [--config=mae_fashion_mnist] [--batch=128] [--eval_batch=500] [--rounds=5]

The MAE step is built by the trainer (train_mae.MAE) at the training batch; extraction is the kNN / linear-probe
feature function (`Encoder.features`, the un-masked encoder on every token, both pools) of that run's encoder at
the evaluation batch. Both run in turn for --rounds rounds (median kept) on random uint8 images. The table gives
images/s of each, XLA's FLOPs per image and the FLOP/s each achieves, and the images/s ratio (the evaluation issue
asks for >= 3x) beside the ratio the FLOPs allow at equal FLOP/s (MAE step FLOPs / extraction FLOPs per image: a
forward pass over every token costs about as much as the MAE step's backward over a quarter of them plus its
decoder). JSON goes to --out.
"""
import importlib
import json
import os

from absl import app, flags

import jax

from bench import harness, jax_steps
from clmae_jax.evaluate.encoder import Encoder, encoder_params
from clmae_jax.models.vit import vit_size

flags.DEFINE_string("config", "mae_fashion_mnist", "configs/<name>.py of the MAE whose encoder is evaluated.")
flags.DEFINE_integer("batch", 0, "Training batch (0: the config's).")
flags.DEFINE_integer("eval_batch", 500, "Feature-extraction batch (the eval configs use 500 on Fashion-MNIST).")
flags.DEFINE_string("attention", "einsum", "config.model.attention (and config.encoder.attention): einsum or xla.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds.")
flags.DEFINE_integer("steps", 3, "Steps (batches) per round and row.")
flags.DEFINE_string("out", "bench/results/extract.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def extraction_runner(config, params, mesh):
    """A timing runner of `Encoder.features` (both pools) at the evaluation batch, inputs sharded as in `bank`."""
    encoder = Encoder("bench", encoder_params(params), vit_size(config.model.size)["num_heads"],
                      tuple(config.input.mean), tuple(config.input.std), attention=FLAGS.attention)
    eval_config = config.copy_and_resolve_references()
    eval_config.batch_size = FLAGS.eval_batch
    batch = harness.random_batch(eval_config, mesh)["image"]
    features, stats = harness.compile_stats(jax.jit(encoder.features), encoder.params, batch)
    return harness.timed(lambda: jax.block_until_ready(features(encoder.params, batch)), FLAGS.steps), stats


def main(argv):
    """Times both, prints the table, writes the JSON."""
    del argv
    config = importlib.import_module(f"configs.{FLAGS.config}").get_config()
    config.batch_size = FLAGS.batch or config.batch_size
    config.model.attention = FLAGS.attention
    built = jax_steps.mae(config)
    experiment = built[0]
    state = experiment.create_train_state()
    extraction, extraction_stats = extraction_runner(config, state.params, experiment.mesh)
    runners = {"mae_step": jax_steps.runner(built, FLAGS.steps), "extraction": extraction}
    timings = harness.alternate(runners, FLAGS.rounds)
    batches = {"mae_step": config.batch_size, "extraction": FLAGS.eval_batch}
    flops = {"mae_step": built[2]["xla_flops"] / config.batch_size,
             "extraction": extraction_stats["xla_flops"] / FLAGS.eval_batch}
    rates = {k: batches[k] / timings[k]["median_seconds"] for k in batches}
    ratio, flop_ratio = rates["extraction"] / rates["mae_step"], flops["mae_step"] / flops["extraction"]
    print(f"{harness.device_line()}; {FLAGS.config}, model {config.model.size}/{config.model.patch_size}, "
          f"{config.input.image_size} px, {FLAGS.attention} attention")
    print("| program | batch | median s/batch | images/s | XLA MFLOP/image | GFLOP/s |\n|---|---|---|---|---|---|")
    for name in batches:
        print(f"| {name} | {batches[name]} | {timings[name]['median_seconds']:.4f} | {rates[name]:.0f} | "
              f"{flops[name] / 1e6:.1f} | {rates[name] * flops[name] / 1e9:.1f} |")
    print(f"extraction / MAE step images/s: {ratio:.2f}x (at equal FLOP/s the FLOPs allow {flop_ratio:.2f}x)")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"config": FLAGS.config, "attention": FLAGS.attention, "device": harness.device_line(),
                   "timings": timings, "images_per_sec": rates, "xla_flops_per_image": flops,
                   "extraction_over_mae_step": ratio, "flop_ratio": flop_ratio}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
