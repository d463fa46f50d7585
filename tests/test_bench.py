"""The benchmarks stay runnable: the update steps build and run where neither TensorFlow nor clu is installed (as on
the GPU machines the benches are meant for), and bench_vs_torch's GPU preset runs end to end on CPU at a tiny size."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

WITHOUT_TENSORFLOW = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu"):
    sys.modules[name] = None  # import fails as if the package were missing
sys.path.insert(0, {root!r})
import jax
from bench import jax_steps
from configs import clmae_vitb, mae_vitb
for module, build in ((mae_vitb, jax_steps.mae), (clmae_vitb, jax_steps.clmae)):
    config = module.get_config("smoke")
    config.input.image_size = 32
    experiment, step, _ = build(config)
    state = jax.block_until_ready(step(experiment.create_train_state()))
    print(module.__name__, int(state.step))
"""


def test_update_steps_build_and_run_without_tensorflow_or_clu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW.format(root=ROOT)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["configs.mae_vitb", "1", "configs.clmae_vitb", "1"]


def test_bench_vs_torch_runs_the_gpu_preset_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "vs_torch.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_vs_torch.py"), "--preset=gpu", "--smoke",
           "--attentions=einsum", "--peers=hf", "--rounds=1", "--steps=1", f"--out={out}"]
    proc = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"jax_mae_einsum", "jax_clmae_einsum", "hf"}, result["not_run"]
    mae, clmae, hf = (result["rows"][n] for n in ("jax_mae_einsum", "jax_clmae_einsum", "hf"))
    assert mae["speedup_over"]["hf"] == pytest.approx(hf["median_seconds"] / mae["median_seconds"])
    assert clmae["speedup_over"] == {}  # No official CL-MAE checkout here: nothing to compare the iteration with.
    assert mae["analytic_flops_per_image"] == hf["analytic_flops_per_image"]
    assert 0.5 < mae["xla_flops_per_image"] / mae["analytic_flops_per_image"] < 2.0
    assert result["clmae_over_mae_flops"] > 2.0
    assert "| jax_mae_einsum |" in proc.stdout
