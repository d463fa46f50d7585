"""A pod's first run, on this machine: the workdir and the data in a bucket of a GCS emulator (tests/gcs_emulator.py),
each process in a local scratch folder of its own (so nothing passes through a shared local disk), hosts joining
through JAX's cluster detection (a SLURM job's environment on localhost): kill -9, preemption, corrupt checkpoints,
a second run, evaluation and export, all against the bucket; and the join decision for each environment."""
import ast
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import BUCKET, ROOT, Main, run_main
from test_docs import commands_in, defined_flags
from test_faults import (CLMAE, FAST, MAE, TOTAL, assert_same_state, free_port, mae_reference,  # noqa: F401
                         stopped_line, wait_for_step)
from clmae_jax.runtime import checkpoint, data, distributed, lock, paths, validate
from clmae_jax.runtime.errors import UserError

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def scratch(tmp_path, name: str) -> dict:
    """Main's keyword arguments for a process that runs in its own empty local folder and logs there."""
    folder = tmp_path / name
    folder.mkdir()
    return dict(cwd=str(folder), env={paths.LOG_ROOT_ENV: str(folder / "logs")})


def upload_fashion_mnist(bucket_folder: str) -> str:
    """The Fashion-MNIST IDX files copied to `bucket_folder`/data; returns that folder."""
    data = paths.join(bucket_folder, "data")
    for name in os.listdir(FASHION_MNIST):
        paths.write_bytes(paths.join(data, name), open(os.path.join(FASHION_MNIST, name), "rb").read())
    return data


def local_gs_folders(root) -> list:
    """Folders under `root` whose name starts with gs: (a gs:// path that went through os calls)."""
    return [os.path.join(d, n) for d, names, _ in os.walk(root) for n in names if n.startswith("gs:")]


# ---------------------------------------------------------------- the path layer --------------------------------


@pytest.mark.parametrize("where", ["local", "gs"])
def test_path_layer_writes_reads_lists_renames_and_removes(where, tmp_path, request):
    root = request.getfixturevalue("gcs") if where == "gs" else str(tmp_path)
    paths.write_text(paths.join(root, "a", "b.json"), '{"x": 1}')
    paths.write_bytes(paths.join(root, "a", "c", "d.bin"), b"\x00\x01")
    assert paths.read_text(paths.join(root, "a", "b.json")) == '{"x": 1}'
    assert paths.size(paths.join(root, "a", "c", "d.bin")) == 2
    assert paths.files_under(paths.join(root, "a")) == ["b.json", "c/d.bin"]
    assert paths.listdir(paths.join(root, "a")) == ["b.json", "c"]
    assert paths.isdir(paths.join(root, "a", "c")) and not paths.isdir(paths.join(root, "a", "b.json"))
    paths.rename(paths.join(root, "a", "c"), paths.join(root, "e"))
    assert paths.read_bytes(paths.join(root, "e", "d.bin")) == b"\x00\x01"
    assert not paths.exists(paths.join(root, "a", "c", "d.bin"))
    paths.remove(paths.join(root, "a"))
    assert not paths.exists(paths.join(root, "a", "b.json"))
    assert paths.absolute(root) == (root if where == "gs" else os.path.abspath(root))


def test_a_gs_workdir_is_checked_in_the_bucket_and_never_becomes_a_local_folder(gcs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    validate.check_workdir(gcs + "/run")
    assert not paths.exists(gcs)  # The probe was written and removed: nothing is left.
    for bad, problem in (("s3://bucket/run", "neither a local folder nor a gs://"), ("gs://", "neither"),
                         ("gs://no-such-bucket-here/run", "cannot be written")):
        with pytest.raises(UserError, match=problem):
            validate.check_workdir(bad)
    assert os.listdir(tmp_path) == []


def test_log_of_a_remote_workdir_stays_on_the_host(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.LOG_ROOT_ENV, str(tmp_path))
    assert paths.host_log_dir("gs://b/runs/x y") == str(tmp_path / "gs" / "b" / "runs" / "x_y")
    assert paths.host_log_dir(str(tmp_path / "run")) == str(tmp_path / "run")


# ---------------------------------------------------------------- one run per workdir on a bucket ---------------


def test_lease_lock_refuses_a_live_holder_and_takes_over_ended_or_expired_ones(gcs):
    held = lock.acquire(gcs)
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        lock.acquire(gcs)
    held.release()
    assert not paths.exists(paths.join(gcs, lock.LOCK_FILE))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holders = {"ended here": {"host": socket.gethostname(), "pid": int(ended.stdout), "expires": time.time() + 60},
               "expired elsewhere": {"host": "another-host", "pid": 1, "expires": time.time() - 1}}
    for holder in holders.values():
        paths.write_text(paths.join(gcs, lock.LOCK_FILE), json.dumps(holder))
        lock.acquire(gcs).release()
    paths.write_text(paths.join(gcs, lock.LOCK_FILE), json.dumps({"host": "another-host", "pid": 1,
                                                                 "expires": time.time() + 60}))
    with pytest.raises(UserError, match=r"\(pid 1 on another-host\)"):
        lock.acquire(gcs)


def test_lease_lock_goes_to_exactly_one_of_two_runs_that_read_it_at_once(gcs, monkeypatch):
    both_read = threading.Barrier(2)
    open_store = lock.lock_store

    class ReadTogether:  # Both runs read the (absent) lock before either writes it: only the precondition decides.
        def __init__(self, workdir):
            self.store, self.reads = open_store(workdir), 0

        def read(self, key):
            found = self.store.read(key)
            self.reads += 1
            if self.reads == 1:
                found.result()
                both_read.wait(timeout=30)
            return found

        def write(self, *args, **kwargs):
            return self.store.write(*args, **kwargs)

    monkeypatch.setattr(lock, "lock_store", ReadTogether)
    outcomes = []

    def start_a_run():
        try:
            outcomes.append(lock.acquire(gcs))
        except UserError as e:
            outcomes.append(e)

    runs = [threading.Thread(target=start_a_run) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    held = [o for o in outcomes if isinstance(o, lock.LeaseLock)]
    assert len(held) == 1 and "in use by another run" in str(next(o for o in outcomes if o not in held))
    held[0].release()


# ---------------------------------------------------------------- every host joins, or the run refuses ------------


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("environment,expected", [
    ({}, None),
    ({**SLURM, "SLURM_NTASKS": "4"}, ("slurm", 4)),
    ({**SLURM, "SLURM_NTASKS": "1"}, ("slurm", 1)),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:3000", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, ("ompi", 8)),
], ids=["laptop", "slurm-4", "slurm-1", "open-mpi-8"])
def test_jax_cluster_detection_describes_each_environment(monkeypatch, environment, expected):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == expected


@pytest.mark.parametrize("mode,explicit,cluster,joins", [
    ("auto", False, None, False), ("auto", False, ("slurm", 1), False), ("auto", False, ("slurm", 4), True),
    ("auto", False, ("gce_tpu", 16), True), ("auto", True, None, True), ("on", False, None, True),
    ("off", False, None, False), ("off", False, ("slurm", 1), False),
])
def test_join_decision(mode, explicit, cluster, joins):
    assert distributed.plan(mode, explicit, cluster) is joins


@pytest.mark.parametrize("cluster", [("slurm", 4), ("gke_tpu", 64)])
def test_off_in_a_multi_process_environment_is_refused(cluster):
    with pytest.raises(UserError, match=rf"one of a {cluster[1]}-process {cluster[0]} job.*--distributed=auto"):
        distributed.plan("off", False, cluster)


def test_an_environment_of_several_processes_that_ends_as_one_is_refused():
    with pytest.raises(UserError, match="describes 4 processes, but 1 joined"):
        distributed.check_joined(("gce_tpu", 4))
    distributed.check_joined(("slurm", 1))
    distributed.check_joined(None)


@pytest.mark.parametrize("mode,address,processes,index,message", [
    ("auto", "", 2, -1, "need --coordinator_address"), ("auto", "", 0, 1, "need --coordinator_address"),
    ("off", "127.0.0.1:1234", 2, 0, "--distributed=off forbids"),
    ("auto", "127.0.0.1:1234", 0, 0, "--num_processes=0 must be"),
    ("auto", "127.0.0.1:1234", 2, 5, "--process_id=5 must be this process's index, 0 to 1"),
    ("auto", "127.0.0.1:1234", 2, -1, "--process_id=-1 must be"),
])
def test_contradictory_process_flags_are_one_line(mode, address, processes, index, message):
    with pytest.raises(UserError, match=message):
        distributed.check_flags(mode, address, processes, index)


# ---------------------------------------------------------------- data in the bucket ------------------------------


FASHION_ROWS = 96


class FashionMnistPart(tfds.core.GeneratorBasedBuilder):
    """The first FASHION_ROWS Fashion-MNIST training images as a tfds dataset, prepared offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)), "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        source = data.fashion_mnist_idx("train", FASHION_MNIST)
        for i, example in enumerate(source.dataset.take(FASHION_ROWS).as_numpy_iterator()):
            yield i, {"image": example["image"], "label": int(example["label"])}


def tfds_rows(data_dir: str) -> list:
    """Every (image bytes, label) of FashionMnistPart in `data_dir`, as the tfds source reads them for training."""
    config = ml_collections.ConfigDict(dict(source="tfds", name=FashionMnistPart.name, data_dir=data_dir,
                                            channels=1))
    source = data.load_source(config, "train")
    return [(data._decode(e["image"], True, 1).numpy().tobytes(), int(e["label"])) for e in source.dataset]


def test_tfds_data_prepared_in_a_bucket_reads_as_it_does_from_a_local_folder(gcs, tmp_path):
    for data_dir in (gcs + "/tfds", str(tmp_path / "tfds")):
        FashionMnistPart(data_dir=data_dir).download_and_prepare()
    from_bucket = tfds_rows(gcs + "/tfds")
    assert len(from_bucket) == FASHION_ROWS and from_bucket == tfds_rows(str(tmp_path / "tfds"))
    assert local_gs_folders(tmp_path) == [] and local_gs_folders(ROOT) == []


# ---------------------------------------------------------------- the README's launch recipes --------------------


def recipe_commands() -> list:
    """Every `python main.py ...` and `python -m bench.NAME ...` command of the README's launch recipes (its section
    "Pods and GPU hosts"), as tokens."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    return commands_in(readme.split("\n## Pods and GPU hosts\n", 1)[1].split("\n## ", 1)[0])


def test_every_launch_recipe_command_names_real_flags_a_valid_config_and_a_usable_bucket(gcs):
    commands = recipe_commands()
    runs = [c for c in commands if c[0] == "main.py" and any(a.startswith("--workdir=gs://") for a in c)]
    assert len(runs) >= 2 and any(c[0] == "-m bench.bench_tpu" for c in commands), commands
    for program, *arguments in commands:
        values = dict(a[2:].split("=", 1) for a in arguments)
        names = {k for k in values if not k.startswith("config.")}
        assert names <= defined_flags(program), (program, names - defined_flags(program))
        file, _, variant = values["config"].removeprefix("configs/").partition(":")
        config = importlib.import_module(f"configs.{file.removesuffix('.py')}").get_config(variant)
        for key, value in values.items():
            if key.startswith("config."):
                field, value = key[len("config."):], value.replace("BUCKET", BUCKET)
                current = validate.get(config, field)
                assert current is not None, f"{program}: --{key} is not a field of {values['config']}"
                config.update_from_flattened_dict({field: value if isinstance(current, str) else
                                                   ast.literal_eval(value)})
        validate.check_config(config)
        if values.get("workdir", "").startswith("gs://"):
            validate.check_workdir(values["workdir"].replace("gs://BUCKET", gcs))


# ---------------------------------------------------------------- runs on the bucket ------------------------------


def garble_largest_state_file(step_folder: str):
    """Random bytes over the middle of the largest array file of a checkpoint step (on the bucket)."""
    files = paths.files_under(paths.join(step_folder, "state"))
    largest = max(files, key=lambda rel: paths.size(paths.join(step_folder, "state", rel)))
    path = paths.join(step_folder, "state", largest)
    content = bytearray(paths.read_bytes(path))
    content[len(content) // 2: len(content) // 2 + 64] = np.random.default_rng(0).bytes(64)
    paths.write_bytes(path, bytes(content))


@pytest.mark.slow
def test_one_process_run_in_a_bucket_survives_kill_9_and_corruption_and_is_read_back(gcs, tmp_path, mae_reference):
    workdir, data = gcs + "/run", upload_fashion_mnist(gcs)
    on_bucket = (*FAST, f"--config.input.data_dir={data}", f"--config.keep_checkpoints={TOTAL}")
    first = Main(workdir, MAE, *on_bucket, **scratch(tmp_path, "first"))
    wait_for_step(first, 3)
    second = run_main(workdir, MAE, *on_bucket, check=False, **scratch(tmp_path, "second"))
    assert second.returncode == 1 and "is in use by another run" in second.last_line(), second.stderr[-2000:]
    while len(checkpoint.committed_steps(checkpoint.checkpoints_directory(workdir))) < 3:
        assert first.proc.poll() is None, first.stderr[-3000:]
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    rerun = run_main(workdir, MAE, *on_bucket, **scratch(tmp_path, "rerun"))
    assert "starting at step 0" not in rerun.stderr and "Taking over" in rerun.stderr
    assert_same_state(mae_reference, workdir)
    for step in (TOTAL - 1, TOTAL):  # Both newest steps unusable: the run falls back two steps and trains again.
        garble_largest_state_file(paths.join(workdir, "checkpoints", str(step)))
    fallback = run_main(workdir, MAE, *on_bucket, **scratch(tmp_path, "fallback"))
    assert f"starting at step {TOTAL - 2} of {TOTAL}" in fallback.stderr
    assert paths.listdir(workdir + "/checkpoints_corrupt") == [f"{TOTAL - 1}-checksum", f"{TOTAL}-checksum"]
    assert_same_state(mae_reference, workdir)
    evaluation = run_main(gcs + "/knn", "eval_knn.py:smoke", f"--config.encoder.checkpoint={workdir}",
                          f"--config.input.data_dir={data}", **scratch(tmp_path, "eval"))
    assert "knn_acc1" in json.loads(paths.read_text(gcs + "/knn/results.json")), evaluation.stderr[-2000:]
    export = subprocess.run([sys.executable, "-m", "clmae_jax.interop", f"--from={workdir}", f"--to={gcs}/mae.pth"],
                            cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert export.returncode == 0 and paths.size(gcs + "/mae.pth") > 0, export.stderr[-2000:]
    for process in ("first", "rerun", "fallback"):
        assert (tmp_path / process / "logs" / "gs").is_dir()
    assert local_gs_folders(tmp_path) == [] and local_gs_folders(ROOT) == []


def slurm_pair(workdir: str, config: str, *overrides, tmp_path, name: str, peer_timeout_s: int = 10) -> list:
    """Processes 0 and 1 of a 2-process run started as a SLURM job step would start them: no coordinator flags,
    each in its own scratch folder; they find each other through JAX's cluster detection."""
    job = {"SLURM_JOB_ID": str(uuid.uuid4().int % 10_000), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "JAX_COORDINATOR_PORT": str(free_port())}
    runs = []
    for i in range(2):
        kwargs = scratch(tmp_path, f"{name}{i}")
        kwargs["env"].update(job, SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
        runs.append(Main(workdir, config, *FAST, *overrides, extra_flags=(f"--peer_timeout_s={peer_timeout_s}",),
                         **kwargs))
    return runs


def finished(runs: list) -> list:
    """Exit statuses of both processes (fails with the log of process 0 when one failed)."""
    codes = [r.wait() for r in runs]
    assert codes == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-2000:]
    return codes


@pytest.mark.slow
def test_two_processes_with_workdir_and_data_in_a_bucket_lose_nothing_to_kill_9(gcs, tmp_path):
    reference = str(tmp_path / "reference")
    finished(slurm_pair(reference, MAE, tmp_path=tmp_path, name="reference"))
    workdir, data = gcs + "/run", upload_fashion_mnist(gcs)
    on_bucket = (f"--config.input.data_dir={data}",)
    runs = slurm_pair(workdir, MAE, *on_bucket, tmp_path=tmp_path, name="killed")
    wait_for_step(runs[0], 4)
    runs[1].proc.send_signal(signal.SIGKILL)
    assert runs[0].wait(timeout=120) == 69 and runs[1].wait() == -signal.SIGKILL, runs[0].stderr[-3000:]
    assert "lost process 1 of this 2-process run" in runs[0].last_line()
    rerun = slurm_pair(workdir, MAE, *on_bucket, tmp_path=tmp_path, name="rerun")
    finished(rerun)
    assert "starting at step 0" not in rerun[0].stderr and "(slurm)" in rerun[0].stderr
    assert_same_state(reference, workdir)


@pytest.mark.slow
def test_preemption_of_one_host_saves_the_step_both_agree_on_in_the_bucket(gcs, tmp_path):
    reference = str(tmp_path / "reference")
    finished(slurm_pair(reference, CLMAE, tmp_path=tmp_path, name="reference"))
    workdir = gcs + "/run"
    runs = slurm_pair(workdir, CLMAE, "--config.checkpoint_every_steps=0", tmp_path=tmp_path, name="preempted")
    wait_for_step(runs[1], 3)
    runs[1].proc.send_signal(signal.SIGTERM)  # The notice reaches one host only.
    assert [r.wait() for r in runs] == [75, 75], runs[0].stderr[-3000:]
    saved = checkpoint.committed_steps(checkpoint.checkpoints_directory(workdir))
    assert len(saved) == 1 and 3 <= saved[0] < TOTAL, saved
    assert [r.last_line() for r in runs] == [stopped_line(signal.SIGTERM, saved[0], workdir)] * 2
    rerun = slurm_pair(workdir, CLMAE, tmp_path=tmp_path, name="rerun")
    finished(rerun)
    assert f"starting at step {saved[0]} of {TOTAL}" in rerun[0].stderr
    assert_same_state(reference, workdir)


# ---------------------------------------------------------------- no run path outside the path layer ------------


# Host-local files, named: the log (console, peers) and the local workdir's flock (lock). Everything else a run reads
# or writes goes through runtime/paths.py.
HOST_LOCAL = {"clmae_jax/runtime/console.py": {"Held.__init__", "keep_in"},
              "clmae_jax/runtime/peers.py": {"read_tail"},
              "clmae_jax/runtime/lock.py": {"WorkdirLock.release", "read_holder", "acquire_local"}}
FILE_CALLS = {"open", "os.open", "os.makedirs", "os.mkdir", "os.replace", "os.rename", "os.remove", "os.unlink",
              "os.rmdir", "os.walk", "os.listdir", "os.scandir", "os.stat", "os.path.exists", "os.path.isdir",
              "os.path.isfile", "os.path.getsize", "os.path.abspath", "os.ftruncate", "os.pwrite", "fcntl.flock",
              "gzip.open", "shutil.rmtree", "shutil.copytree", "shutil.move", "tempfile.TemporaryFile",
              "tempfile.mkdtemp", "np.save", "np.savez", "np.load", "tf.io.gfile.GFile", "tf.io.gfile.exists",
              "tf.io.gfile.walk", "tf.io.gfile.listdir", "tf.io.gfile.isdir", "tf.io.gfile.makedirs"}


def file_calls(path: str) -> list:
    """[(function, call)] of every file-system call in a module, by its dotted name (numpy's readers and writers
    count unless their file is an io.BytesIO; calls on __file__ do not count)."""
    tree = ast.parse(open(path).read())
    in_memory = {ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                 and ast.unparse(n.value).startswith("io.BytesIO(") for t in n.targets}
    found = []

    def on_a_path(call: ast.Call) -> bool:
        name = ast.unparse(call.func)
        if name not in FILE_CALLS:
            return False
        first = ast.unparse(call.args[0]) if call.args else ""
        if first == "__file__":  # Where the code itself is, not a run's file.
            return False
        return not (name.startswith("np.") and (first in in_memory or first.startswith("io.BytesIO(")))

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Call) and on_a_path(child):
                found.append((scope, ast.unparse(child.func)))
            visit(child, inner)

    visit(tree, "")
    return found


def test_no_file_call_on_a_run_path_outside_the_path_layer():
    offending = []
    for package in ("clmae_jax", "cbm_jax"):
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in names:
                rel = os.path.relpath(os.path.join(folder, name), ROOT)
                if not name.endswith(".py") or rel == "clmae_jax/runtime/paths.py":
                    continue
                allowed = HOST_LOCAL.get(rel, set())
                offending += [f"{rel}:{scope} {call}" for scope, call in file_calls(os.path.join(folder, name))
                              if scope not in allowed]
    offending += [f"main.py:{scope} {call}" for scope, call in file_calls(os.path.join(ROOT, "main.py"))]
    assert offending == []
