"""cuDNN attention at the project's sequence lengths, and every experiment compiled for an H100 without a GPU.

The padding that lets cuDNN's fused kernel take 197 tokens is checked on the CPU against the einsum reference
(through jax.nn.dot_product_attention's XLA implementation, which takes the same sequence lengths). The H100
compiles need the CUDA plugin (`requirements-gpu.txt`, installed by `.ci/setup test`) and take seconds.
"""
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clmae_jax.models import vit
from clmae_jax.runtime.errors import UserError

CUDA_PLUGIN = any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (13, 12)) \
    if importlib.util.find_spec("jax_plugins") else False
needs_plugin = pytest.mark.skipif(not CUDA_PLUGIN, reason="H100 compiles need the CUDA plugin: "
                                  "pip install -r requirements-gpu.txt")


def qkv(length: int, dtype, heads: int = 3, dim: int = 32):
    """Random [2, length, heads, dim] queries, keys and values."""
    rng = np.random.default_rng(length)
    return [jnp.asarray(rng.normal(size=(2, length, heads, dim)), dtype) for _ in range(3)]


@pytest.mark.parametrize("length", [197, 50, 65])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_padded_attention_equals_einsum_attention_with_its_gradients(length, dtype, tolerance):
    q, k, v = qkv(length, dtype)
    weights = jnp.linspace(-1, 1, length)[None, :, None, None]  # Every output row matters to the gradient.
    loss = lambda attention: lambda *x: (attention(*x).astype(jnp.float32) * weights).sum()
    padded = lambda *x: vit.padded_attention(*x, "xla", multiple=2 if length % 2 else 64)
    np.testing.assert_allclose(*(np.asarray(f(q, k, v), np.float32) for f in (padded, vit.einsum_attention)),
                               atol=tolerance, rtol=tolerance)
    for ours, reference in zip(*(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v)
                                 for f in (padded, vit.einsum_attention))):
        scale = float(jnp.abs(reference.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32),
                                   atol=tolerance * scale, rtol=tolerance)


def test_cudnn_attention_on_cpu_is_a_one_line_error_naming_the_option():
    with pytest.raises(UserError, match="config.model.attention='cudnn'") as error:
        vit.ViTClassifier(10, patch_size=4, width=16, depth=1, num_heads=2, attention="cudnn").init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    assert "\n" not in str(error.value) and "compiles for cpu" in str(error.value)


def test_the_h100_target_describes_the_bf16_peak_the_roofline_uses():
    from bench import gpu
    h100 = gpu.gpu("h100")
    text = h100.target_config()
    rate = text.split("matrix_unit_description")[1].split("key: 16")[1]
    clock, units, ops = (float(rate.split(f"{name}: ")[1].split()[0])
                         for name in ("clock_rate_ghz", "units_per_core", "ops_per_clock"))
    assert abs(2 * h100.field("core_count") * units * ops * clock * 1e9 / h100.bf16_flops - 1) < 0.01
    assert not re.search(r"^\s*collective_memory_granularity", text, re.M)  # jaxlib 0.10's proto lacks it.
    assert h100.bandwidth == 3352320000000 and 79 < h100.memory_bytes / 2**30 < 80


def compile_for_h100(name: str, gpus: int = 1, **model) -> dict:
    """{program: per-GPU figures} of every program of config `name`'s smoke variant compiled for `gpus` H100s."""
    import importlib

    from bench import bench_gpu, gpu
    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    config.batch_size = 8 * gpus  # CL-MAE's smoke loss groups are 8 images.
    config.model.update(model)
    return bench_gpu.compile_all(config, gpu.gpu("h100"), gpus)


@pytest.mark.slow
@needs_plugin
@pytest.mark.parametrize("name", ["mae_vitb", "clmae_vitb", "cbm_vit_cifar100", "finetune_fashion_mnist"])
def test_every_vit_program_runs_cudnn_attention_when_compiled_for_an_h100(name):
    rows = compile_for_h100(name, attention="cudnn", dtype="bfloat16")
    assert rows and all(r["cudnn_attention_calls"] > 0 for r in rows.values()), \
        {p: r["cudnn_attention_calls"] for p, r in rows.items()}
    assert all(r["fits"] and r["hlo_flops_per_gpu"] > 0 and r["roofline_seconds"] > 0 for r in rows.values())


@pytest.mark.slow
@needs_plugin
def test_einsum_attention_compiles_for_an_h100_without_cudnn_calls_and_cnns_too():
    assert all(r["cudnn_attention_calls"] == 0 for r in compile_for_h100("mae_vitb").values())
    assert compile_for_h100("cbm_fashion_mnist")["train_step"]["hlo_flops_per_gpu"] > 0


@pytest.mark.slow
@needs_plugin
def test_eight_gpus_of_one_host_all_reduce_the_gradients():
    step = compile_for_h100("mae_vitb", gpus=8, attention="cudnn")["mae_step"]
    assert step["collectives"]["all-reduce"]["count"] > 0 and step["collectives"]["all-gather"]["count"] == 0


@needs_plugin
def test_hlo_flops_count_a_matmul_and_a_loop_body_per_iteration():
    from bench import gpu
    h100 = gpu.gpu("h100")
    devices = gpu.topology_devices(h100)
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)), jax.sharding.PartitionSpec())
    spec = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16, sharding=sharding)
    chain = lambda times: jax.jit(lambda a, b: jax.lax.fori_loop(0, times, lambda _, x: jnp.tanh(x @ b), a))
    one, four = (gpu.compile_program(chain(n), spec, spec, target=h100)[1] for n in (1, 4))
    assert one["hlo_flops_per_gpu"] == 2 * 1024 ** 3 and four["hlo_flops_per_gpu"] == 4 * 2 * 1024 ** 3
    assert one["roofline_compute_seconds"] == pytest.approx(2 * 1024 ** 3 / 989e12)


@pytest.mark.slow
@needs_plugin
def test_hlo_flops_of_the_mae_step_match_the_analytic_count():
    from bench import flops
    from configs import mae_vitb
    config = mae_vitb.get_config("smoke")
    config.batch_size = 8
    step = compile_for_h100("mae_vitb", attention="cudnn")["mae_step"]
    # Within 0.3% for ViT-B (docs/gpu.md); the smoke model's patch embedding weighs more, and the analytic count
    # gives it an input gradient that no step computes.
    assert step["hlo_flops_per_gpu"] == pytest.approx(flops.mae_flops(config) * 8, rel=0.1)


@needs_plugin
def test_heads_wider_than_cudnn_takes_fall_back_to_xla_attention():
    from bench import gpu
    devices = gpu.topology_devices(gpu.gpu("h100"))
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = jax.ShapeDtypeStruct((2, 197, 640), jnp.bfloat16, sharding=whole)
    for heads, calls in ((2, 0), (4, 2)):  # Heads 320 wide (ViT-H's masking module), then 160: forward + backward.
        model = vit.Attention(heads, jnp.bfloat16, "cudnn")
        with gpu.targeting(mesh):
            params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole),
                                  jax.eval_shape(model.init, jax.random.PRNGKey(0), spec))
            loss = lambda p, x: model.apply(p, x).astype(jnp.float32).sum()
            compiled = jax.jit(jax.grad(loss)).lower(params, spec).compile()
        assert gpu.hlo_costs(compiled.as_text())["cudnn_attention_calls"] == calls


@pytest.mark.slow
def test_gpu_check_runs_every_row_on_cpu_without_tensorflow(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT, cpu_env
    pytest.importorskip("transformers")
    out = tmp_path / "gpu_check.json"
    # One CBM case: CvT-13 runs the same code and would add a minute of CPU compile.
    cmd = [sys.executable, "-m", "bench.gpu_check", "--smoke", "--peers=hf", "--rounds=1",
           "--steps=1", "--cbm_cases=resnet18:food101", f"--out={out}"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["jax_worker_loaded"] == [] and result["smoke"]
    assert set(result["rows"]) == {"jax_mae_einsum", "jax_clmae_einsum", "jax_cbm_resnet18", "hf"}, result["not_run"]
    rows = result["rows"]
    assert rows["jax_mae_einsum"]["speedup_over"]["hf"] > 0 and rows["jax_clmae_einsum"]["speedup_over"] == {}
    assert all(r["images_per_sec"] > 0 and r["mfu_measured_peak"] > 0 for n, r in rows.items() if n != "hf")
    assert rows["jax_cbm_resnet18"]["batch"] == 8 and "| jax_cbm_resnet18 |" in proc.stdout


@needs_plugin
def test_cudnn_attention_in_float32_is_a_one_line_error_naming_the_dtype():
    from bench import gpu
    mesh = jax.sharding.Mesh(np.array(gpu.topology_devices(gpu.gpu("h100"))), ("data",))
    with gpu.targeting(mesh), pytest.raises(UserError, match="config.model.dtype='bfloat16'"):
        jax.eval_shape(vit.Attention(2, jnp.float32, "cudnn").init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 16)))
