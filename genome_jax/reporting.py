"""Run reports: metrics.jsonl (one record per generation), the summary line, progress bars, result.json, fitness.png.

Every file is written atomically (temp name in the same folder, then os.replace) so a killed run never leaves a
half-written report; metrics.jsonl is append-only and is cut back to the resumed generation on resume.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from genome_jax import faults

METRICS = "metrics.jsonl"
RESULT = "result.json"
PLOT = "fitness.png"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False, default=_jsonable)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    faults.point("json_temp_written")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    try:  # numpy / jax scalars and arrays
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    except Exception:
        raise TypeError(f"not JSON serialisable: {type(x).__name__}") from None


def clean_float(x: Any) -> float | None:
    """JSON has no NaN: non-finite fitness (a failed individual) is written as null."""
    x = float(x)
    return x if math.isfinite(x) else None


def append_metrics(output_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one generation's record as a JSON line, flushed to disk before returning."""
    with open(Path(output_dir) / METRICS, "a") as f:
        f.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = Path(output_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(output_dir: str | os.PathLike, last_generation: int) -> None:
    """Keep only records with generation <= last_generation (resume: later ones are redone)."""
    path = Path(output_dir) / METRICS
    if not path.exists():
        return
    kept = [r for r in read_metrics(output_dir) if r.get("generation", -1) <= last_generation]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    faults.point("metrics_temp_written")
    os.replace(tmp, path)


def fitness_stats(fitness: Sequence[float]) -> dict[str, float | None]:
    """best / mean / worst over the finite values (NaN = failed individual, never best)."""
    finite = [float(f) for f in fitness if math.isfinite(float(f))]
    if not finite:
        return {"best": None, "mean": None, "worst": None}
    return {"best": max(finite), "mean": sum(finite) / len(finite), "worst": min(finite)}


def _fmt(x: float | None) -> str:
    return "  n/a " if x is None else f"{x:.4f}"


def summary_line(record: dict[str, Any], max_iter: int | None = None) -> str:
    """One line per generation: fitness spread and where the time went."""
    g = record["generation"]
    t = record.get("time", {})
    total = f"/{max_iter}" if max_iter else ""
    ev = record.get("evaluated", {})
    return (
        f"gen {g}{total}  best {_fmt(record['best'])}  mean {_fmt(record['mean'])}  worst {_fmt(record['worst'])}"
        f"  | ops {t.get('operators', 0.0):.2f}s  export {t.get('export', 0.0):.2f}s  score {t.get('scoring', 0.0):.2f}s"
        f"  ({ev.get('scored', 0)} scored, {ev.get('cached', 0)} cached)"
    )


def progress_bar(total: int, desc: str, *, disable: bool = False, unit: str = "ind"):
    """A tqdm bar on stderr (ETA included); the caller updates it as units (default: individuals) finish."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=disable, dynamic_ncols=True)


def plot_fitness(
    records: Iterable[dict[str, Any]],
    path: str | os.PathLike,
    *,
    test_bars: dict[str, float | None] | None = None,
    reference: dict[str, float | None] | None = None,
    title: str = "",
    ylabel: str = "dev fitness",
) -> None:
    """fitness.png: best / mean (worst as the band's floor) per generation, and test bars when given.

    test_bars: label -> test score (e.g. {"best expert": .31, "evolved best": .35, "ensemble k=3": .36}).
    reference: label -> a dev fitness drawn as a horizontal dotted line (e.g. the best initial expert).
    """
    import matplotlib  # heavy (~0.5 s): only a finished run draws

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    recs = sorted(records, key=lambda r: r["generation"])
    gens = [r["generation"] for r in recs]
    nan = float("nan")
    best = [nan if r["best"] is None else r["best"] for r in recs]
    mean = [nan if r["mean"] is None else r["mean"] for r in recs]
    worst = [nan if r["worst"] is None else r["worst"] for r in recs]
    bars = {k: v for k, v in (test_bars or {}).items() if v is not None}
    ncols = 2 if bars else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if bars else [1]})
    ax = axes[0][0]
    ax.fill_between(gens, worst, best, color="tab:blue", alpha=0.12, label="worst..best")
    ax.plot(gens, best, marker="o", color="tab:blue", label="best in population")
    if all(r.get("best_ever") is not None for r in recs) and any(r["best_ever"] != r["best"] for r in recs):
        ax.step(gens, [r["best_ever"] for r in recs], where="post", color="navy", linewidth=1,
                label="best so far")
    ax.plot(gens, mean, marker=".", linestyle="--", color="tab:orange", label="mean")
    for label, value in (reference or {}).items():
        if value is not None and math.isfinite(value):
            ax.axhline(value, color="tab:gray", linestyle=":", linewidth=1.2, label=label)
    ax.set_xlabel("generation (0 = initial population)")
    ax.set_ylabel(ylabel)
    ax.set_title("fitness per generation" if not title else title)
    if gens:
        ax.set_xticks(gens if len(gens) <= 20 else gens[:: max(1, len(gens) // 10)])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if bars:
        bx = axes[0][1]
        labels = list(bars)
        values = [bars[k] for k in labels]
        colors = ["tab:gray" if "expert" in k else "tab:green" if "ensemble" in k else "tab:blue" for k in labels]
        pos = range(len(labels))
        bx.bar(pos, values, color=colors)
        for i, v in zip(pos, values):
            bx.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        bx.set_xticks(list(pos))
        bx.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        bx.set_ylabel("test score")
        bx.set_ylim(0, max(values) * 1.25 if max(values) > 0 else 1.0)  # room for the labels; differences visible
        bx.set_title("test split")
        bx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    faults.point("plot_temp_written")
    os.replace(tmp, path)


def plot_test_bars(path: str | os.PathLike, labels: Sequence[str], scores: Sequence[float], errors: Sequence[float], *,
                   xlabel: str, chance: float | None = None, base: float | None = None) -> None:
    """A horizontal bar per row (test score as a fraction, error bar in the same unit), drawn in percent, with the
    chance level and the base model as vertical lines when given; written atomically (temp file + rename)."""
    import matplotlib  # heavy (~0.5 s): only a finished report draws

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.5))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, [100 * s for s in scores], xerr=[100 * e for e in errors], color="#4c72b0", capsize=3)
    ax.set_yticks(y, list(labels))
    if chance is not None:
        ax.axvline(100 * chance, color="grey", ls=":", label="chance")
    if base is not None:
        ax.axvline(100 * base, color="#c44e52", ls="--", label="base model")
    if chance is not None or base is not None:
        ax.legend(loc="lower right")
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
