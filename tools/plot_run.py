"""Plot a run's learning curve (mean reward and exact-answer rate per step) from its metrics.jsonl.

    python -m tools.plot_run outputs/<date>/<time> --out docs/img/default_run.png
    python -m tools.plot_run RUN_A RUN_B --label "ours" --label "other" --out curve.png

Each run directory (or metrics.jsonl path) is one pair of lines; the dotted line is the exact-answer
rate on the training prompts. A run with the held-out evaluation on (`trainer.eval_every`) adds a
third line with markers: the greedy exact rate on the held-out prompts (`eval/exact`), unsmoothed. Needs matplotlib (not a dependency of the recipe: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: str):
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values, k: int):
    out = []
    for i in range(len(values)):
        window = values[max(0, i - k + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    p.add_argument("--label", action="append", default=[], help="one per run (default: the path)")
    p.add_argument("--smooth", type=int, default=5, help="moving average over this many steps")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("tools.plot_run needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for i, run in enumerate(args.runs):
        records = load(run)
        rows = [r for r in records if "reward/mean" in r]  # a step-0 record holds only the evaluation
        steps = [r["step"] for r in rows]
        label = args.label[i] if i < len(args.label) else str(run)
        (line,) = ax.plot(steps, smooth([r["reward/mean"] for r in rows], args.smooth), label=f"{label}: reward")
        ax.plot(
            steps,
            smooth([r["reward/accuracy"] for r in rows], args.smooth),
            linestyle=":",
            color=line.get_color(),
            label=f"{label}: exact",
        )
        evals = [r for r in records if r.get("eval/exact") is not None]
        if evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["eval/exact"] for r in evals],
                marker="o",
                markersize=3,
                linestyle="--",
                color=line.get_color(),
                label=f"{label}: held-out exact (greedy)",
            )
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if args.title:
        ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
