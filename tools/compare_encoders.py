"""Every evaluation protocol on several pretrained encoders (and the raw-pixel baseline), one table.

    python -m tools.compare_encoders runs/mae_fmnist runs/clmae_fmnist --evals=knn,linear,fewshot,finetune

Each protocol runs as a user would run it, `python main.py --config=configs/eval_<protocol>.py` (fine-tuning:
configs/finetune_<dataset>.py with model.init_from), in --out/<encoder>/<protocol>, so reruns resume and skip what
is done. Prints a markdown table (one row per encoder: the protocols' accuracies in percent and their wall times)
and writes it to --out/compare.json. --override=PROTOCOL:--config.KEY=VALUE passes a config override to one
protocol's runs (e.g. `--override=linear:--config.evals.linear.cache_features=True`).
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTOCOLS = ("knn", "linear", "fewshot", "finetune")
RAW_PIXELS = "raw_pixels"

flags.DEFINE_list("evals", ["knn", "linear", "fewshot"], f"Protocols, from {', '.join(PROTOCOLS)}.")
flags.DEFINE_string("out", "runs/compare", "Folder for the evaluation workdirs and compare.json.")
flags.DEFINE_string("dataset", "fashion_mnist", "Config variant word of the data set (eval configs), and the "
                    "finetune_<dataset>.py file.")
flags.DEFINE_bool("raw_pixels", True, "Add the raw-pixel row (kNN / linear / few-shot on the normalised pixels).")
flags.DEFINE_bool("scratch", True, "With finetune: add a row fine-tuning the same ViT from random weights.")
flags.DEFINE_multi_string("override", [], "PROTOCOL:--config.KEY=VALUE, an override for that protocol's runs.")

# results.json key(s) of each protocol shown in the table; fine-tuning accuracies are fractions.
COLUMNS = {
    "knn": (("knn_acc1", "kNN acc@1", 1), ("knn_accnn", "kNN acc@NN", 1)),
    "linear": (("linear_acc1", "linear acc@1", 1),),
    "fewshot": (("fewshot_1shot_knn_acc1", "1-shot kNN", 1), ("fewshot_5shot_knn_acc1", "5-shot kNN", 1),
                ("fewshot_10shot_knn_acc1", "10-shot kNN", 1), ("fewshot_10shot_linear_acc1", "10-shot linear", 1)),
    "finetune": (("best_test_accuracy", "fine-tune best", 100), ("final_test_accuracy", "fine-tune final", 100)),
}


def overrides(protocol: str) -> list:
    """The --override values given for `protocol`; a malformed one stops the script."""
    found = []
    for entry in flags.FLAGS.override:
        name, _, value = entry.partition(":")
        if name not in PROTOCOLS or not value.startswith("--config."):
            sys.exit(f"error: --override={entry} is not PROTOCOL:--config.KEY=VALUE with PROTOCOL one of "
                     f"{', '.join(PROTOCOLS)}.")
        if name == protocol:
            found.append(value)
    return found


def command(protocol: str, encoder: str, workdir: str) -> list:
    """The main.py command line of `protocol` on `encoder` ('' = fine-tuning from random weights)."""
    if protocol == "finetune":
        config, weights = f"{ROOT}/configs/finetune_{flags.FLAGS.dataset}.py", f"--config.model.init_from={encoder}"
    else:
        config = f"{ROOT}/configs/eval_{protocol}.py:{flags.FLAGS.dataset}"
        weights = f"--config.encoder.checkpoint={encoder}"
    return [sys.executable, f"{ROOT}/main.py", f"--config={config}", f"--workdir={workdir}", weights,
            *overrides(protocol)]


def run_protocol(protocol: str, encoder: str, workdir: str) -> tuple[dict, float]:
    """(results.json, wall seconds) of one protocol, its log in workdir/log.txt; a failure stops the script."""
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        code = subprocess.call(command(protocol, encoder, workdir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        sys.exit(f"error: {protocol} on {encoder or 'random weights'} failed; see {workdir}/log.txt")
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f), time.time() - start


def table(rows: dict, protocols: list) -> str:
    """Markdown table: encoder | each protocol's columns | wall minutes per protocol."""
    columns = [c for p in protocols for c in COLUMNS[p]]
    head = ["encoder", *[c[1] for c in columns], *[f"{p} min" for p in protocols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [f"{row['results'][key] * scale:.2f}" if key in row["results"] else "-" for key, _, scale in columns]
        cells += [f"{row['seconds'][p] / 60:.1f}" if p in row["seconds"] else "-" for p in protocols]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def main(argv):
    """Runs the protocols on every encoder given, prints and writes the comparison."""
    encoders = [os.path.abspath(a) for a in argv[1:]]
    unknown = [p for p in flags.FLAGS.evals if p not in PROTOCOLS]
    if not encoders or unknown:
        sys.exit(f"usage: compare_encoders.py WORKDIR [WORKDIR ...] --evals={','.join(PROTOCOLS)}"
                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    rows = {os.path.basename(e.rstrip("/")): e for e in encoders}
    if flags.FLAGS.raw_pixels:
        rows[RAW_PIXELS] = RAW_PIXELS
    if "finetune" in flags.FLAGS.evals and flags.FLAGS.scratch:
        rows["random_init"] = ""
    report = {}
    for name, encoder in rows.items():
        report[name] = {"encoder": encoder, "results": {}, "seconds": {}}
        for protocol in flags.FLAGS.evals:
            if (encoder == RAW_PIXELS and protocol == "finetune") or (not encoder and protocol != "finetune"):
                continue  # Pixels are not fine-tuned; random weights are only fine-tuned.
            results, seconds = run_protocol(protocol, encoder, os.path.join(flags.FLAGS.out, name, protocol))
            report[name]["results"].update(results)
            report[name]["seconds"][protocol] = seconds
            print(f"{name} {protocol}: done in {seconds / 60:.1f} min", flush=True)
    print(table(report, flags.FLAGS.evals))
    with open(os.path.join(flags.FLAGS.out, "compare.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    app.run(main)
