"""Draw a run's curves to a PNG: its training losses and learning rate against steps (output_dir/train_steps.jsonl)
and its validation metrics against steps (output_dir/log.txt).

    python plot_curves.py output/blip2_stage1_demo                      # -> output/blip2_stage1_demo/curves.png
    python plot_curves.py output/stage2 --metrics val_CIDEr val_Bleu_4 --output stage2.png

Validation panel: the metrics named with --metrics, else every `val_*` (and `vqa_val_*`) number but counts ("_n").
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from utils import InputError, run_main  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a training run's --output_dir")
    parser.add_argument("--output", help="the PNG (default: OUTPUT_DIR/curves.png)")
    parser.add_argument("--metrics", nargs="+", help="validation metrics to draw (default: all val_* numbers)")
    return parser.parse_args(argv)


def read_records(path):
    """The JSON objects of a JSON-lines file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(f"{path} is not JSON lines ({e}); is it a run's log?") from None


def loss_names(records):
    return sorted({k for r in records for k in r if k == "loss" or k.startswith("loss_")})


def metric_names(evaluations, chosen):
    if chosen:
        missing = [m for m in chosen if not any(m in e for e in evaluations)]
        if missing:
            known = sorted({k for e in evaluations for k in e})
            raise InputError(f"--metrics {', '.join(missing)}: not in log.txt; it holds {', '.join(known)}")
        return chosen
    return sorted({k for e in evaluations for k, v in e.items() if k.startswith(("val_", "vqa_val_"))
                   and isinstance(v, (int, float)) and not k.endswith("_n")})


def draw(steps, evaluations, metrics, path):
    """Three panels (losses, LR, validation metrics) against steps, saved to `path`."""
    figure, (losses, lr, validation) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for name in loss_names(steps):
        points = [(r["step"], r[name]) for r in steps if name in r]
        losses.plot(*zip(*points), label=name)
    losses.set(title="training losses", xlabel="step", yscale="log")
    lr.plot([r["step"] for r in steps], [r["lr"] for r in steps])
    lr.set(title="learning rate", xlabel="step")
    for name in metrics:
        points = [(e["step"], e[name]) for e in evaluations if name in e]
        validation.plot(*zip(*points), marker="o", label=name)
    validation.set(title="validation", xlabel="step")
    for axes in (losses, validation):
        if axes.lines:
            axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    steps = read_records(os.path.join(args.output_dir, "train_steps.jsonl"))
    if not steps:
        raise InputError(f"{args.output_dir} has no train_steps.jsonl records: is it the --output_dir of a training "
                         "run (records are written every train.print_freq steps)?")
    evaluations = [e for e in read_records(os.path.join(args.output_dir, "log.txt")) if "step" in e]
    output = args.output or os.path.join(args.output_dir, "curves.png")
    draw(steps, evaluations, metric_names(evaluations, args.metrics), output)
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
