"""Summarise a Hydra multirun sweep: one row per job, a markdown table and a plot.

    python -m tools.sweep_report multirun/<date>/<time>
    python -m tools.sweep_report --latest          # the newest directory under multirun/

Reads each job's `.hydra/config.yaml`, `status.json` and `metrics.jsonl`; writes
`report.md` and `report.png` into the sweep directory and prints the table. Works on partial
sweeps: a job with no status yet is listed as "running/incomplete".
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import yaml

COLUMNS = [
    "job",
    "fsdp",
    "offload",
    "lora",
    "status",
    "final_reward",
    "sync_total_s",
    "sync_gather_s",
    "sync_load_s",
    "sync_gbps",
    "peak_mem_mb",
    "parity_max_diff",
    "step_s",
    "error",
]


def _median(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def _max(rows: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]  # skip nan
    return max(values) if values else None


def read_metrics(path: Path) -> List[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return rows


def read_job(job_dir: Path) -> Dict:
    cfg = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
    status_file = job_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.exists() else {"status": "incomplete", "error": ""}
    steps = [r for r in read_metrics(job_dir / "metrics.jsonl") if "reward/mean" in r]
    last = steps[-3:]
    peak = _max(steps, "sync/peak_mem_bytes")
    return {
        "job": job_dir.name,
        "fsdp": cfg["fsdp"]["name"],
        "offload": cfg["offload"]["name"],
        "lora": cfg["lora"]["name"],
        "status": status["status"],
        "final_reward": statistics.mean(r["reward/mean"] for r in last) if last else None,
        "rewards": [r["reward/mean"] for r in steps],
        "sync_total_s": _median(steps, "sync/total_s"),
        "sync_gather_s": _median(steps, "sync/gather_s"),
        "sync_load_s": _median(steps, "sync/load_s"),
        "sync_gbps": _median(steps, "sync/gbps"),
        "peak_mem_mb": peak / 2**20 if peak is not None else None,
        "parity_max_diff": _max(steps, "sync/parity_max_abs_diff"),
        "step_s": _median(steps, "time/step_s"),
        "error": (status.get("error") or "").splitlines()[0][:120] if status.get("error") else "",
    }


def collect(sweep_dir: Path) -> List[Dict]:
    jobs = [d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra" / "config.yaml").exists()]
    return [read_job(d) for d in sorted(jobs, key=lambda d: int(d.name) if d.name.isdigit() else d.name)]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def markdown(rows: List[Dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    lines += ["", "jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    timed = [r for r in rows if r["sync_total_s"] is not None]
    labels = [f"{r['fsdp']}/{r['offload']}/{r['lora']}" for r in timed]
    ax1.barh(labels, [r["sync_total_s"] for r in timed])
    ax1.set_xlabel("median sync total (s)")
    ax1.set_title("sync time by combination")
    for r in rows:
        if r["rewards"]:
            ax2.plot(range(1, len(r["rewards"]) + 1), r["rewards"], label=f"{r['fsdp']}/{r['offload']}/{r['lora']}")
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean reward")
    ax2.set_title("reward curves")
    if any(r["rewards"] for r in rows):
        ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path) -> str:
    rows = collect(sweep_dir)
    if not rows:
        raise SystemExit(f"no Hydra jobs (*/.hydra/config.yaml) under {sweep_dir}")
    table = markdown(rows)
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir}\n\n{table}")
    plot(rows, sweep_dir / "report.png")
    return table


def latest_sweep(root: Path = Path("multirun")) -> Path:
    dirs = sorted(p for p in root.glob("*/*") if p.is_dir())
    if not dirs:
        raise SystemExit(f"no sweep directories under {root}/")
    return dirs[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", nargs="?", type=Path)
    parser.add_argument("--latest", action="store_true", help="use the newest directory under multirun/")
    args = parser.parse_args()
    if args.sweep_dir is None and not args.latest:
        parser.error("give a sweep directory or --latest")
    sweep_dir = latest_sweep() if args.latest else args.sweep_dir
    print(report(sweep_dir))
    print(f"wrote {sweep_dir / 'report.md'} and {sweep_dir / 'report.png'}")


if __name__ == "__main__":
    main()
