"""Joining a multi-process run: every host joins JAX's coordination service, or the run refuses to start.

The coordination service is what a pod run's fault tolerance stands on: the preemption sync point (all processes
save the same step after a SIGTERM), the SIGTERM handler that feeds it, and the heartbeats that name a lost peer.
On a Cloud TPU VM slice libtpu connects the chips without it, so a run that never called
`jax.distributed.initialize()` trains, but a preemption kills it unsaved; elsewhere every process would train
alone and write over the others' workdir. So `--distributed=auto` (the default) asks JAX's own cluster detection
(SLURM, Open MPI, Cloud TPU VMs on GCE and GKE, Kubernetes) whether this process is one of several and initializes
then, `on` always initializes, `off` never does; and whatever the mode, a run whose processes do not match what
the environment describes stops with one line before anything is built.
"""
import jax
from absl import logging

from clmae_jax.runtime import jax_compat, peers
from clmae_jax.runtime.errors import UserError

MODES = ("auto", "on", "off")


def detected_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment JAX's detection finds for this process, or None."""
    for env in jax_compat.cluster_types():
        if not env.opt_in_only_method and env.is_env_present():
            return env.name, env.get_process_count()
    return None


def check_flags(mode: str, coordinator_address: str, num_processes: int, process_id: int):
    """The flags make sense together (one line naming the flag and the fix otherwise)."""
    if mode not in MODES:
        raise UserError(f"--distributed={mode} is not a mode; use one of {', '.join(MODES)}.")
    explicit = bool(coordinator_address)
    if not explicit and (num_processes or process_id >= 0):
        raise UserError("--num_processes and --process_id need --coordinator_address=HOST:PORT (process 0's); give "
                        "it, or drop them to let the cluster environment decide.")
    if explicit and mode == "off":
        raise UserError("--coordinator_address joins a multi-process run, which --distributed=off forbids; drop one.")
    if explicit and num_processes < 1:
        raise UserError(f"--num_processes={num_processes} must be the number of processes (at least 1) with "
                        "--coordinator_address.")
    if explicit and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be this process's index, 0 to {num_processes - 1} with "
                        f"--num_processes={num_processes}.")


def plan(mode: str, explicit: bool, cluster: tuple[str, int] | None) -> bool:
    """Whether to call `jax.distributed.initialize()`: the decision of the module docstring."""
    if mode == "off":
        if cluster and cluster[1] > 1:
            raise UserError(f"This process is one of a {cluster[1]}-process {cluster[0]} job, and "
                            "--distributed=off would make each train alone into the same workdir; use "
                            "--distributed=auto.")
        return False
    return mode == "on" or explicit or bool(cluster and cluster[1] > 1)


def initialize(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               peer_timeout_s: int = 120):
    """Joins the run's other processes as `plan` decides, then checks that every process the environment
    describes is there. `peer_timeout_s` bounds the wait for the others to start, and how long a silent peer
    (killed, preempted, its host gone) goes unnoticed before the survivors stop with its name."""
    if peer_timeout_s < 1:
        raise UserError(f"--peer_timeout_s={peer_timeout_s} must be at least 1 second; the default is 120.")
    check_flags(mode, coordinator_address, num_processes, process_id)
    cluster = None if coordinator_address else detected_cluster()
    if plan(mode, bool(coordinator_address), cluster):
        # CPU processes exchange collectives over gloo; other platforms ignore this option.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        explicit = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                        process_id=process_id) if coordinator_address else {}
        where = (f"process {process_id} of {num_processes} could not reach the others through the coordinator at "
                 f"{coordinator_address}" if coordinator_address else
                 f"this process could not join the {cluster[0] if cluster else 'cluster'} job's other processes")
        peers.exit_on_abort(lambda: f"error: {where} within --peer_timeout_s={peer_timeout_s} s: a process never "
                                    "started, or the coordinator cannot be reached; start the same command on every "
                                    "host (process 0's address first), then rerun.")
        jax.distributed.initialize(**explicit, initialization_timeout=peer_timeout_s,
                                   heartbeat_timeout_seconds=peer_timeout_s)
    check_joined(cluster)
    logging.info("process %d/%d, %d local / %d global devices%s", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), f" ({cluster[0]})" if cluster else "",
                 extra={"log_only": jax.process_count() == 1})  # On one process the console has nothing to learn.


def check_joined(cluster: tuple[str, int] | None):
    """Raises UserError when the processes that joined are not the run the environment describes."""
    count = jax.process_count()
    if cluster and cluster[1] != count:
        raise UserError(f"The {cluster[0]} environment describes {cluster[1]} processes, but {count} joined; start "
                        "the same command on every host (--distributed=auto).")
    if count > 1 and not jax_compat.has_coordination_service():
        raise UserError(f"{count} processes are connected without JAX's coordination service (a TPU slice whose "
                        "hosts were not found), so a preemption could not be saved; use --distributed=on.")
    foreign = [d for d in jax.devices() if d.process_index != jax.process_index()]
    if count == 1 and foreign:
        raise UserError(f"This single process sees {len(foreign)} devices of other processes; start it on every "
                        "host with --distributed=auto.")

