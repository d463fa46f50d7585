"""Encoder evaluation: kNN against a naive numpy kNN (1 device, 8 devices, 2 processes), the linear probe on
separable features, the few-shot sampler, encoder loading from real MAE / CL-MAE runs, geometry errors, the
pretraining evaluator (compiled once) and the eval experiment's results.json with resume."""
import importlib.util
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clmae_jax.evaluate import bank as bank_lib, fewshot, knn, linear, load
from clmae_jax.runtime import checkpoint, mesh as mesh_lib
from clmae_jax.runtime.errors import UserError
from conftest import ROOT, Main, cpu_env, load_params, run_main, shared_dir, traces

NUM_CLASSES, DIM = 6, 12


def random_problem(seed=0, num_train=500, num_test=150):
    """Random features with random labels: any mistake in the search changes the neighbours."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(num_train, DIM)).astype(np.float32), rng.integers(0, NUM_CLASSES, num_train),
            rng.normal(size=(num_test, DIM)).astype(np.float32), rng.integers(0, NUM_CLASSES, num_test))


def naive_knn(train_x, train_y, test_x, test_y, k, metric="euclidean", vote="majority", temperature=0.07):
    """The official loop in numpy: distances, stable sort, torch.mode-style vote (ties to the smallest label)."""
    if metric == "cosine":
        train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
        test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
        score = test_x @ train_x.T
    else:
        score = -np.linalg.norm(test_x[:, None] - train_x[None], axis=-1)
    nearest = np.argsort(-score, axis=1, kind="stable")[:, :k]
    labels = train_y[nearest]
    if vote == "weighted":
        weights = np.exp(np.take_along_axis(score, nearest, 1) / temperature)
        predicted = np.array([np.bincount(l, w, NUM_CLASSES).argmax() for l, w in zip(labels, weights)])
    else:
        predicted = np.array([np.bincount(l, minlength=NUM_CLASSES).argmax() for l in labels])
    return {"acc1": 100 * np.mean(predicted == test_y), "accnn": 100 * np.mean((labels == test_y[:, None]).any(1)),
            "count": float(len(test_y))}


def process_batches(x, y, local_batch):
    """This process's contiguous share of (x, y) as padded batches with mask and example index, as eval_iterator."""
    n, procs, me = len(y), jax.process_count(), jax.process_index()
    bounds = np.linspace(0, n, procs + 1).round().astype(int)
    start, stop = bounds[me], bounds[me + 1]
    num_batches = -(-(-(-n // procs)) // local_batch)
    batches = []
    for b in range(num_batches):
        rows = np.arange(start + b * local_batch, start + (b + 1) * local_batch)
        real = rows < stop
        rows = np.where(real, rows, start)
        batches.append({"features": x[rows], "label": y[rows].astype(np.int32), "mask": real.astype(np.int32),
                        "index": np.where(real, rows, -1).astype(np.int32)})
    return batches


def feature_bank(mesh, x, y, batch_size, chunk):
    """A sharded bank of given features, built through the same writer as extracted features."""
    batches = process_batches(x, y, batch_size // jax.process_count())
    global_batches = (mesh_lib.to_global(b, mesh) for b in batches)
    return bank_lib.build_banks(mesh, global_batches, len(batches), batch_size,
                                lambda b: {"f": b["features"]}, chunk)["f"]


def sharded_knn(k, metric, vote):
    """kNN of random_problem() on all devices of all processes: bank chunks of 16 rows, 32 queries at a time."""
    mesh = mesh_lib.make_mesh()
    train_x, train_y, test_x, test_y = random_problem()
    train = feature_bank(mesh, train_x, train_y, batch_size=64, chunk=16)
    test = feature_bank(mesh, test_x, test_y, batch_size=64, chunk=32)
    return knn.knn_accuracy(mesh, train, test, NUM_CLASSES, k=k, metric=metric, vote_kind=vote, chunk=16,
                            query_batch=32)


CASES = [(5, "euclidean", "majority"), (20, "cosine", "weighted"), (1, "euclidean", "majority")]


def expected(case):
    k, metric, vote = case
    return naive_knn(*random_problem(), k=k, metric=metric, vote=vote)


@pytest.mark.parametrize("case", CASES)
def test_knn_equals_naive_numpy(case):
    got = sharded_knn(*case)
    assert got == pytest.approx(expected(case), abs=1e-9)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(devices: int, processes: int) -> list:
    """Runs this file as kNN workers; returns each process's JSON output."""
    env = cpu_env(devices)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(port), str(processes), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in range(processes)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.slow
@pytest.mark.parametrize("devices,processes", [(8, 1), (2, 2)])
def test_knn_sharded_over_devices_and_processes(devices, processes):
    for output in run_workers(devices, processes):
        assert output["devices"] == devices * processes
        for case, got in zip(CASES, output["results"]):
            # Every test image counted exactly once, whatever the layout.
            assert got == pytest.approx(expected(case), abs=1e-9), case


def test_knn_ignores_padding_rows_of_the_bank():
    mesh = mesh_lib.make_mesh()
    train_x, train_y, test_x, test_y = random_problem(num_train=37, num_test=11)
    train = feature_bank(mesh, train_x, train_y, batch_size=16, chunk=8)  # 48 rows, 11 of them padding.
    test = feature_bank(mesh, test_x, test_y, batch_size=16, chunk=16)
    got = knn.knn_accuracy(mesh, train, test, NUM_CLASSES, k=5, chunk=8, query_batch=16)
    assert train.num_examples == 37 and got == pytest.approx(naive_knn(train_x, train_y, test_x, test_y, 5))


def separable_problem(n, seed):
    """Features whose labels are a linear function of them (argmax of a random linear map), with a margin."""
    w = np.random.default_rng(123).normal(size=(DIM, NUM_CLASSES))  # One labelling for train and test.
    x = np.random.default_rng(seed).normal(size=(4 * n, DIM)).astype(np.float32)
    logits = x @ w
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > 0.5  # A margin, so "separable" survives float noise.
    return x[keep][:n] * 3 + 1, logits[keep][:n].argmax(1)  # Shifted and scaled: the BatchNorm must undo it.


def test_linear_probe_separates_separable_features():
    mesh = mesh_lib.make_mesh()
    train_x, train_y = separable_problem(2048, 0)
    test_x, test_y = separable_problem(512, 1)
    train = feature_bank(mesh, train_x, train_y, batch_size=256, chunk=256)
    test = feature_bank(mesh, test_x, test_y, batch_size=256, chunk=256)
    # lr 6.4: MAE's linear-probe lr at batch 16384 (0.1 x 16384 / 256); CL-MAE's unscaled 0.1 needs far more steps.
    config = ml_collections.ConfigDict(dict(lr=6.4, batch_size=128, epochs=20, warmup_epochs=2.0, seed=0))
    steps = train.num_examples // config.batch_size
    batches = linear.cached_epochs(*linear.local_rows(train), config.batch_size, steps, 0,
                                   lambda b: mesh_lib.to_global(b, mesh))
    head = linear.ProbeHead(NUM_CLASSES)
    state = linear.train_head(head, config, DIM, steps, batches, lambda _, b: b["features"])
    assert linear.probe_accuracy(head, state, test)["acc1"] > 99.0


def test_lars_matches_mae_reference_update():
    # MAE util/lars.py by hand: wd, trust ratio on matrices only, mu = 0.9 mu + g, p -= lr mu.
    params = {"w": jnp.array([[3.0, 4.0]]), "b": jnp.array([1.0, -1.0])}
    grads = {"w": jnp.array([[0.6, 0.8]]), "b": jnp.array([0.5, 0.5])}
    tx = linear.lars(0.1, weight_decay=0.0)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    updates, _ = tx.update(grads, state, params)
    trust = 0.001 * 5.0 / 1.0
    np.testing.assert_allclose(updates["w"], -0.1 * 1.9 * trust * np.array([[0.6, 0.8]]), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], -0.1 * 1.9 * np.array([0.5, 0.5]), rtol=1e-6)


def test_few_shot_sampler_takes_n_per_class_deterministically():
    labels = np.random.default_rng(0).integers(0, 10, 3000)
    for shots in (1, 5, 10):
        picked = fewshot.sample_few_shot(labels, shots, seed=3, num_classes=10)
        assert np.bincount(labels[picked], minlength=10).tolist() == [shots] * 10
        np.testing.assert_array_equal(picked, fewshot.sample_few_shot(labels, shots, seed=3, num_classes=10))
        assert not np.array_equal(picked, fewshot.sample_few_shot(labels, shots, seed=4, num_classes=10))
    with pytest.raises(UserError, match="fewer than"):
        fewshot.sample_few_shot(np.zeros(5, int), 1, seed=0, num_classes=2)


def test_one_shot_knn_is_the_nearest_neighbour():
    mesh = mesh_lib.make_mesh()
    train_x, train_y, test_x, test_y = random_problem(seed=1)
    shots = np.array([np.flatnonzero(train_y == c)[0] for c in range(NUM_CLASSES)])  # One image per class.
    test = feature_bank(mesh, test_x, test_y, batch_size=64, chunk=32)
    config = ml_collections.ConfigDict(dict(knn=dict(k=5, metric="euclidean", vote="majority", temperature=0.07)))
    ours = fewshot.fewshot_knn(jnp.asarray(train_x[shots]), jnp.asarray(train_y[shots], jnp.int32), test, config,
                               NUM_CLASSES, mesh, shots=1)
    assert ours == pytest.approx(naive_knn(train_x[shots], train_y[shots], test_x, test_y, k=1)["acc1"])


# ----- Real checkpoints and the eval experiment.

def train_both(base: str):
    """One-step MAE and CL-MAE runs on Fashion-MNIST in base/mae and base/clmae, trained in parallel."""
    runs = [Main(os.path.join(base, name), f"{name}_fashion_mnist.py:test", "--config.total_steps=1",
                 "--config.checkpoint_every_steps=1") for name in ("mae", "clmae")]
    for run in runs:
        assert run.wait(300) == 0, run.stderr[-3000:]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """{"mae": dir, "clmae": dir} of `train_both`, trained once for the whole session."""
    base = shared_dir(tmp_path_factory, "mae_and_clmae_runs", train_both)
    return {name: os.path.join(base, name) for name in ("mae", "clmae")}


def encoder_config(checkpoint, **fields):
    return ml_collections.ConfigDict(dict(encoder=dict(checkpoint=checkpoint, step=-1, **fields),
                                          input=dict(mean=(0.5,), std=(0.5,))))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mae", "clmae"])
def test_loading_a_run_gives_the_encoder_weights_bit_for_bit(runs, kind):
    saved = load_params(runs[kind], 1)
    mae = saved["mae"] if kind == "clmae" else saved
    for path in (runs[kind], os.path.join(runs[kind], "checkpoints", "1")):  # Workdir or step folder.
        encoder = load.load_encoder(encoder_config(path))
        assert encoder.step == 1 and set(encoder.params) == {"patch_embed", "cls_token", "encoder"}
        jax.tree.map(np.testing.assert_array_equal, encoder.params, {k: mae[k] for k in encoder.params})
    # The evaluation encoder's CLS feature is the MAE encoder's output on all tokens, exactly.
    from clmae_jax.models.clmae import build_mae
    from clmae_jax.models.mae import MaskedAutoencoder
    train_config = checkpoint.read_train_config(os.path.join(runs[kind], "checkpoints", "1"))
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype(np.uint8)
    x = (images / 255.0 - 0.286) / 0.353
    model = build_mae(train_config)
    tokens = model.apply({"params": mae}, x, method=MaskedAutoencoder.embed)
    reference = model.apply({"params": mae}, tokens, method=MaskedAutoencoder.forward_encoder)[:, 0]
    ours = encoder.module().apply({"params": encoder.params}, x)["cls"]
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.slow
def test_geometry_mismatch_is_one_line_naming_both_sides(runs):
    with pytest.raises(UserError) as error:
        load.load_encoder(encoder_config(runs["mae"], size="base", patch_size=16))
    message = str(error.value)
    assert "\n" not in message and "width 128, depth 4, patch 4" in message and "width 768, depth 12, patch 16" in message
    from clmae_jax.evaluate.evaluators import EncoderProtocolEvaluator
    from configs import mae_fashion_mnist
    config = mae_fashion_mnist.get_config("test")
    config.model.size = "tiny"
    evaluator = EncoderProtocolEvaluator(ml_collections.ConfigDict(dict(type="knn", k=5)), config, mesh_lib.make_mesh())
    with pytest.raises(UserError, match="width 128.*width 192"):
        evaluator.run(load_params(runs["mae"], 1))


@pytest.mark.slow
def test_pretraining_knn_evaluator_compiles_once(runs):
    from clmae_jax.evaluate.evaluators import EncoderProtocolEvaluator
    from configs import eval_knn, mae_fashion_mnist
    config = mae_fashion_mnist.get_config("test")
    entry = eval_knn.knn_entry(num_train=200, num_test=100, every_steps=50)
    evaluator = EncoderProtocolEvaluator(entry, config, mesh_lib.make_mesh())
    params = load_params(runs["mae"], 1)
    first = evaluator.run(params)
    with traces() as traced:
        second = evaluator.run(jax.tree.map(lambda p: p * 1.01, params))
    assert traced == []  # Feature extraction and the kNN scan were not traced (nor compiled) again.
    assert evaluator.every_steps == 50 and evaluator.best_key == "knn_acc1"
    assert set(first) == {"knn_acc1", "knn_accnn"} and 0 <= second["knn_acc1"] <= 100


def test_knn_chunk_that_does_not_divide_the_bank_is_the_one_the_scan_uses(tmp_path):
    from clmae_jax.evaluate import run
    from configs import eval_knn
    results = {}
    for chunk in (1000, 4096):  # 5,000 training rows: 1,000 tiles them as they are, 4,096 pads them to 8,192.
        config = eval_knn.get_config("smoke")
        config.update_from_flattened_dict({"encoder.checkpoint": "raw_pixels", "knn_chunk": chunk,
                                           "cache_features_on_disk": False, "evals.knn.num_train": 5000})
        results[chunk] = run.evaluate_encoder(config, str(tmp_path / str(chunk)))["knn_acc1"]
    assert results[1000] == results[4096] > 10


@pytest.mark.slow
def test_eval_experiment_writes_results_and_resumes(runs, tmp_path):
    from clmae_jax.evaluate import run
    from configs import eval_fewshot, eval_knn
    config = eval_knn.get_config("smoke")
    config.evals.fewshot = eval_fewshot.get_config("smoke").evals.fewshot
    config.encoder.checkpoint = runs["clmae"]
    workdir = str(tmp_path / "eval")
    results = run.evaluate_encoder(config, workdir)
    assert {"knn_acc1", "knn_accnn", "fewshot_1shot_knn_acc1", "fewshot_1shot_linear_acc1_std"} <= set(results)
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["knn_acc1"] == results["knn_acc1"]
    assert os.listdir(os.path.join(workdir, "features"))
    # A rerun skips what is done: a planted value survives.
    with open(os.path.join(workdir, "results.json")) as f:
        planted = {**json.load(f), "knn_acc1": -1.0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(planted, f)
    assert run.evaluate_encoder(config, workdir)["knn_acc1"] == -1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mae", "clmae"])
def test_fine_tuning_starts_from_the_pretrained_encoder(runs, kind, tmp_path):
    from cbm_jax.train_supervised import build_classifier, init_variables
    from configs import finetune_fashion_mnist
    config = finetune_fashion_mnist.get_config("test")
    config.model.init_from = runs[kind]
    params = init_variables(build_classifier(config, 10), config, 10)["params"]
    saved = load_params(runs[kind], 1)
    saved = saved["mae"] if kind == "clmae" else saved
    for key in ("patch_embed", "cls_token"):
        jax.tree.map(np.testing.assert_array_equal, params[key], saved[key])
    assert "norm" not in params["encoder"] and {"fc_norm", "head"} <= set(params)  # MAE's global pool.
    jax.tree.map(np.testing.assert_array_equal, params["encoder"],
                 {k: v for k, v in saved["encoder"].items() if k != "norm"})
    config.model.size = "tiny"
    with pytest.raises(UserError, match=r"^Encoder geometry mismatch: .*width 128.* config.model \(size 'tiny'"):
        init_variables(build_classifier(config, 10), config, 10)


@pytest.mark.slow
def test_fine_tuning_from_an_exported_pytorch_file_equals_from_the_run(runs, tmp_path):
    pytest.importorskip("torch")
    from cbm_jax.train_supervised import build_classifier, init_variables
    from clmae_jax.interop import params_geometry, save_fbmae
    from configs import finetune_fashion_mnist
    saved = load_params(runs["mae"], 1)
    path = str(tmp_path / "mae.pth")
    save_fbmae(saved, params_geometry(saved, image_size=28, num_heads=4, decoder_heads=4), path)
    config = finetune_fashion_mnist.get_config("test")
    model = build_classifier(config, 10)
    config.model.init_from = path
    from_file = init_variables(model, config, 10)["params"]
    config.model.init_from = runs["mae"]
    jax.tree.map(np.testing.assert_array_equal, from_file, init_variables(model, config, 10)["params"])


@pytest.mark.slow
def test_fine_tuning_run_through_main(runs, tmp_path):
    workdir, steps = str(tmp_path / "finetune"), 60
    # Mixup, drop path and layer decay off and a higher lr, so 60 steps of 64 images learn (38% measured); a run
    # that does not train stays near 10%.
    run = run_main(workdir, "finetune_fashion_mnist.py:test", f"--config.model.init_from={runs['mae']}",
                   f"--config.total_steps={steps}", "--config.batch_size=64", "--config.checkpoint_every_steps=30",
                   "--config.mix.prob=0.0", "--config.optimizer.lr=1e-3", "--config.optimizer.warmup_epochs=0.0",
                   "--config.optimizer.layer_decay=1.0", "--config.model.drop_path=0.0")
    assert f"from the encoder {runs['mae']}@1" in run.stderr
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert results["final_test_accuracy"] > 0.25 and results["step"] == steps
    if importlib.util.find_spec("torch"):  # The fine-tuned classifier goes out to PyTorch bit for bit.
        from clmae_jax.interop.__main__ import main
        from clmae_jax.interop.classifier_torch import load_torch_weights
        main([f"--from={workdir}", f"--to={tmp_path / 'ft.pth'}"])
        geometry, params = load_torch_weights(str(tmp_path / "ft.pth"))
        assert (geometry["pool"], geometry["pos_embed"], geometry["num_classes"]) == ("gap_norm", "learned", 10)
        jax.tree.map(np.testing.assert_array_equal, params, load_params(workdir, steps))


def test_unknown_variant_is_a_user_error():
    from configs import eval_knn, eval_linear
    with pytest.raises(UserError, match="cosin"):
        eval_knn.get_config("cosin")
    with pytest.raises(UserError, match="data sets"):
        eval_linear.get_config("imagenet,cifar10")
    assert eval_knn.get_config("imagenet").input.eval_crop_ratio == 0.875
    assert eval_knn.get_config("cosine").evals.knn.k == 20


if __name__ == "__main__":  # A kNN worker process (see run_workers): port, number of processes, process id.
    port, processes, process_id = (int(a) for a in sys.argv[1:4])
    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", processes, process_id)
    print(json.dumps({"devices": jax.device_count(), "results": [sharded_knn(*case) for case in CASES]}))
