"""bench_vs_torch stays runnable: its GPU preset runs end to end on CPU at a tiny size, and the JAX rows load neither
TensorFlow, tfds nor clu (the GPU machines the benches are meant for may have none of them)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, cpu_env


@pytest.mark.slow
def test_bench_vs_torch_runs_the_gpu_preset_on_cpu_without_tensorflow(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "vs_torch.json"
    cmd = [sys.executable, "-m", "bench.bench_vs_torch", "--preset=gpu", "--smoke",
           "--attentions=einsum", "--peers=hf", "--rounds=1", "--steps=1", f"--out={out}"]
    proc = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["jax_worker_loaded"] == []
    assert set(result["rows"]) == {"jax_mae_einsum", "jax_clmae_einsum", "hf"}, result["not_run"]
    mae, clmae, hf = (result["rows"][n] for n in ("jax_mae_einsum", "jax_clmae_einsum", "hf"))
    assert mae["speedup_over"]["hf"] == pytest.approx(hf["all_seconds"][0] / mae["all_seconds"][0])  # One round.
    assert clmae["speedup_over"] == {}  # No official CL-MAE checkout here: nothing to compare the iteration with.
    assert mae["analytic_flops_per_image"] == hf["analytic_flops_per_image"]
    assert 0.5 < mae["xla_flops_per_image"] / mae["analytic_flops_per_image"] < 2.0
    assert result["clmae_over_mae_flops"] > 2.0
    assert "| jax_mae_einsum |" in proc.stdout
