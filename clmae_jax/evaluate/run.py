"""`main.py` experiment "eval": every protocol of config.evals on the encoder that config.encoder names.

Writes WORKDIR/results.json (percent keys named after the protocol, e.g. knn_acc1, linear_acc1), TensorBoard
scalars at the encoder's step, and prints a table. A rerun resumes: protocols whose results (for the same
protocol config and encoder) are in results.json are skipped, few-shot seeds already done are kept, the linear
probe continues from its last epoch checkpoint, and extracted features are reused from WORKDIR/features.
"""
import json

import jax
from absl import logging

from clmae_jax.evaluate import protocols
from clmae_jax.evaluate.load import load_encoder
from clmae_jax.runtime import mesh as mesh_lib, metrics, paths

RESULTS = "results.json"


def entries(evals) -> list:
    """[(name, eval_config)] of config.evals: a ConfigDict of named entries, or a list of entries with a type."""
    if isinstance(evals, (list, tuple)):
        return [(e.get("name") or f"{e.type}{i}", e) for i, e in enumerate(evals)]
    return sorted(evals.items())


def read_results(workdir: str) -> dict:
    """results.json of an earlier run in `workdir`, or {}."""
    path = paths.join(workdir, RESULTS)
    return json.loads(paths.read_text(path)) if paths.exists(path) else {}


def format_table(rows: dict) -> str:
    """A markdown table of {key: percent}."""
    lines = ["| metric | % |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    return "\n".join(lines)


def evaluate_encoder(config, workdir: str) -> dict:
    """Runs config.evals on config.encoder.checkpoint; returns the results dict also written to results.json."""
    mesh = mesh_lib.make_mesh(config.get("mesh"))
    encoder = load_encoder(config)
    params = jax.device_put(encoder.params, mesh_lib.replicated(mesh)) if encoder.params is not None else None
    todo = [(name, protocols.protocol_type(name, c), c) for name, c in entries(config.evals)]
    pools = set().union(*[protocols.pools_needed(kind, c) for _, kind, c in todo])
    cache_dir = paths.join(workdir, "features") if config.get("cache_features_on_disk", True) else ""
    features = protocols.FeatureSets(mesh, config.input, encoder, params, pools, config.batch_size,
                                     config.knn_chunk, cache_dir)
    previous = read_results(workdir)
    if previous.get("encoder") != encoder.name:
        previous = {}  # Another encoder wrote these: nothing to resume.
    results = {**previous, "encoder": encoder.name, "step": encoder.step, "configs": previous.get("configs", {})}
    writer = metrics.create_writer(workdir)
    for name, kind, eval_config in todo:
        signature = eval_config.to_dict()
        if results["configs"].get(name) == signature:
            logging.info("%s: already in %s, skipped", name, RESULTS)
            continue
        resume = protocols.Resume(
            workdir=workdir, on_result=lambda r: metrics.write_json(workdir, RESULTS, {**results, **r}),
            done={k: v for k, v in results.items() if k.startswith(f"{name}_") and "_seed" in k})
        scalars = protocols.PROTOCOLS[kind](eval_config, features, prefix=name, resume=resume)
        results.update(scalars)
        results["configs"][name] = signature
        metrics.write_json(workdir, RESULTS, results)
        writer.write_scalars(encoder.step, {k: v for k, v in scalars.items() if "_seed" not in k})
        logging.info("%s: %s", name, ", ".join(f"{k} {v:.2f}" for k, v in scalars.items() if "_seed" not in k))
    writer.flush()
    table = {k: v for k, v in results.items() if isinstance(v, float) and "_seed" not in k}
    if jax.process_index() == 0:
        print(f"\nEncoder {encoder.name}\n{format_table(table)}", flush=True)
    return results
