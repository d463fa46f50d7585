"""Times the jitted MAE update step and the CL-MAE iteration (MAE step + masking-module step) side by side.

    python bench/bench_steps.py [--sizes=tiny,base] [--batch=8] [--steps=5] [--out=bench/results/steps.json]

Prints a table: images/s (compile excluded), model FLOPs per image (analytic matmul count, forward + backward),
achieved FLOP/s as a fraction of a matmul peak measured on the same machine in the same run, and the CL-MAE/MAE
step-time ratio. Inputs are random uint8 images: this measures compute, not the input pipeline.
"""
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clmae_jax import train_clmae, train_mae  # noqa: E402
from clmae_jax.models.vit import vit_size  # noqa: E402
from clmae_jax.runtime import optim  # noqa: E402
from clmae_jax.runtime.state import TrainState  # noqa: E402
from configs import clmae_vitb  # noqa: E402

flags.DEFINE_list("sizes", ["tiny", "base"], "ViT sizes to time (patch 16, 224 px).")
flags.DEFINE_integer("batch", 8, "Global batch.")
flags.DEFINE_integer("steps", 5, "Timed steps after two warm-up (compile) steps.")
flags.DEFINE_string("out", "bench/results/steps.json", "Where the JSON goes.")
FLAGS = flags.FLAGS


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward matmul FLOPs of `depth` blocks on `tokens` tokens: qkv, attention, projection, MLP."""
    per_block = 2 * tokens * width * (3 * width + width + 2 * mlp_ratio * width) + 2 * 2 * tokens ** 2 * width
    return depth * per_block


def mae_flops(config) -> float:
    """Forward + backward (3x forward) matmul FLOPs of one MAE step per image."""
    m, size = config.model, vit_size(config.model.size)
    patches = (config.input.image_size // m.patch_size) ** 2
    visible = train_mae.num_visible(patches, config.mae.mask_ratio)
    embed = 2 * patches * m.patch_size ** 2 * 3 * size["width"]
    encoder = transformer_flops(visible + 1, size["width"], size["depth"])
    decoder = transformer_flops(patches + 1, m.decoder_width, m.decoder_depth)
    heads = 2 * (visible + 1) * size["width"] * m.decoder_width + 2 * patches * m.decoder_width * m.patch_size ** 2 * 3
    return 3 * (embed + encoder + decoder + heads)


def clmae_flops(config) -> float:
    """Forward + backward FLOPs of one CL-MAE iteration per image: MAE step + module step on all tokens."""
    m, size = config.model, vit_size(config.model.size)
    patches = (config.input.image_size // m.patch_size) ** 2
    masker = transformer_flops(patches + 1, size["width"], config.clmae.masker_depth) + 2 * size["width"] * patches
    full_mae = (transformer_flops(patches + 1, size["width"], size["depth"])
                + transformer_flops(patches + 1, m.decoder_width, m.decoder_depth))
    # MAE step: its own cost plus a module forward. Module step: module forward + backward (3x), full MAE forward
    # plus the backward to its inputs only (2x: the frozen MAE needs no weight gradients).
    return mae_flops(config) + masker + 3 * masker + 2 * full_mae


def matmul_peak(n: int = 3072, trials: int = 3) -> float:
    """FLOP/s of a large float32 matmul, best of `trials`: the practical peak of this machine for dense work."""
    a, b = jax.random.normal(jax.random.PRNGKey(0), (2, n, n))
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def bench_config(size: str):
    """CL-MAE ViT-size/16 at 224 px, float32 (CPU), at the benchmark batch."""
    config = clmae_vitb.get_config()
    config.model.size = size
    config.model.dtype = "float32"
    config.batch_size = FLAGS.batch
    config.clmae.loss_group_size = FLAGS.batch
    config.optimizer.schedule = "constant"
    config.optimizer.lr = 1e-4
    return config


def time_steps(step_fns, state, batch) -> tuple[float, float]:
    """(compile seconds, seconds per iteration) of running `step_fns` in sequence."""
    def iterate(state):
        for fn in step_fns:
            state = fn(state)
        jax.block_until_ready(state)
        return state

    start = time.perf_counter()
    state = iterate(iterate(state))
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state = iterate(state)
    return compile_seconds, (time.perf_counter() - start) / FLAGS.steps


def bench_size(size: str) -> dict:
    """MAE step and CL-MAE iteration timings for one ViT size."""
    config = bench_config(size)
    images = jax.random.randint(jax.random.PRNGKey(0), (FLAGS.batch, 224, 224, 3), 0, 256).astype(jnp.uint8)
    batch = {"image": images}
    lr_schedule = optim.schedule(config.optimizer, 1e-4, 1, 1)

    mae = train_mae.build_mae(config)
    tx = optim.make_optimizer(config.optimizer, lr_schedule)
    params = train_mae.init_params(mae, config, jax.random.PRNGKey(0))
    mae_state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    mae_step = jax.jit(train_mae.make_train_step(mae, tx, lr_schedule, config), donate_argnums=(0,))
    mae_compile, mae_seconds = time_steps([lambda s: mae_step(s, batch)[0]], mae_state, batch)

    model = train_clmae.CLMAE(config)
    ctx = train_clmae.make_optimizer(config)
    params = model.init(jax.random.PRNGKey(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state={k: ctx.init(v) for k, v in params.items()})
    first, second = train_clmae.make_steps(model, ctx, lr_schedule, config)
    first, second = jax.jit(first, donate_argnums=(0,)), jax.jit(second, donate_argnums=(0,))
    steps = [lambda s: first(s, batch)[0], lambda s: second(s, batch, jnp.float32(1.0))[0]]
    clmae_compile, clmae_seconds = time_steps(steps, state, batch)
    return {"size": size, "batch": FLAGS.batch, "mae_images_per_sec": FLAGS.batch / mae_seconds,
            "mae_step_seconds": mae_seconds, "mae_compile_seconds": mae_compile,
            "mae_gflops_per_image": mae_flops(config) / 1e9, "clmae_images_per_sec": FLAGS.batch / clmae_seconds,
            "clmae_iteration_seconds": clmae_seconds, "clmae_compile_seconds": clmae_compile,
            "clmae_gflops_per_image": clmae_flops(config) / 1e9, "clmae_over_mae_time": clmae_seconds / mae_seconds}


def main(argv):
    """Measures the matmul peak, then every size, and prints and saves the table."""
    del argv
    peak = matmul_peak()
    rows = [bench_size(size) for size in FLAGS.sizes]
    for row in rows:
        row["mae_fraction_of_peak"] = row["mae_gflops_per_image"] * 1e9 * row["mae_images_per_sec"] / peak
        row["clmae_fraction_of_peak"] = row["clmae_gflops_per_image"] * 1e9 * row["clmae_images_per_sec"] / peak
    print(f"\n{jax.devices()[0].device_kind} x{jax.device_count()}, float32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"batch {FLAGS.batch}, 224 px, patch 16")
    header = ("size", "MAE img/s", "MAE GFLOP/img", "MAE %peak", "CL-MAE img/s", "CL-MAE GFLOP/img", "CL-MAE %peak",
              "CL-MAE/MAE time")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(f"| ViT-{r['size']}/16 | {r['mae_images_per_sec']:.2f} | {r['mae_gflops_per_image']:.1f} | "
              f"{100 * r['mae_fraction_of_peak']:.0f}% | {r['clmae_images_per_sec']:.2f} | "
              f"{r['clmae_gflops_per_image']:.1f} | {100 * r['clmae_fraction_of_peak']:.0f}% | "
              f"{r['clmae_over_mae_time']:.2f}x |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "peak_flops": peak, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
