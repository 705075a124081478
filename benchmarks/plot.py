"""`xlsparse bench --plot`: one PNG with two panels per run, the speed-up of each row over its
baseline (log scale, 1x marked) and each row's roofline share (the target's 80% marked)."""
import math
import os


def row_label(row: dict, full: bool = False) -> str:
    density = "" if row.get("density") is None else f" {100 * row['density']:.3g}%"
    masks = "" if row.get("masks", "uniform") == "uniform" else " [real masks]"
    baseline = row["baseline"] or "-"
    if not full:
        baseline = baseline.split(" (")[0]  # the name without its explanation
    return f"{row['op']} {row['shape']}{density} {row['dtype']}{masks} vs {baseline}"


def row_labels(rows: list[dict]) -> list[str]:
    """One label per row; rows whose short labels coincide (SpIEL's two ways on CUDA) keep their
    baselines' full names, so that no two bars carry one label."""
    short = [row_label(r) for r in rows]
    return [row_label(r, full=True) if short.count(s) > 1 else s for r, s in zip(rows, short)]


def plot(rows: list[dict], path: str, title: str = "") -> str:
    """Write the PNG of `rows` (the dicts of harness.Row) to `path` and return `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("--plot: no benchmark rows to plot")
    labels = row_labels(rows)
    speedups = [r["speedup"] if r.get("speedup") else math.nan for r in rows]
    shares = [r["roofline_pct"] if r.get("roofline_pct") is not None else math.nan for r in rows]
    colours = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    height = max(3.0, 0.28 * len(rows) + 1.5)
    fig, (ax_speed, ax_share) = plt.subplots(1, 2, figsize=(16, height), sharey=True)
    y = list(range(len(rows)))
    ax_speed.barh(y, speedups, color=colours)
    ax_speed.axvline(1.0, color="black", linewidth=0.8)
    ax_speed.set_xscale("log")
    ax_speed.set_xlabel("speed-up: baseline median / xlsparse median (> 1: xlsparse faster)")
    ax_speed.set_yticks(y, labels, fontsize=7)
    ax_speed.invert_yaxis()
    ax_share.barh(y, shares, color="tab:blue")
    ax_share.axvline(80.0, color="black", linewidth=0.8, linestyle="--")
    ax_share.set_xlabel("roofline share, % (GEMM rate or copy bandwidth)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
