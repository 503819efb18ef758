#!/usr/bin/env python3
"""Plots docs/strategies.csv (written by `iris-eval strategies`) as a PNG in
the manner of the paper's figure 4: mean Dice against the number of
references (ensemble size, retrieval top-k, tuning cases), one line per
strategy, on the aligned query and averaged over the moved ones.

    python3 scripts/plot_strategies.py [docs/strategies.csv] [docs/strategies.png]

Needs matplotlib (`python3 -m pip install matplotlib==3.9.2`); not run by CI.
"""

import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def main() -> None:
    source = sys.argv[1] if len(sys.argv) > 1 else "docs/strategies.csv"
    target = sys.argv[2] if len(sys.argv) > 2 else "docs/strategies.png"
    # (strategy, n) -> [aligned dice, moved dice...]
    cells = defaultdict(list)
    with open(source, newline="") as f:
        for row in csv.DictReader(f):
            dice = float(row["dice"]) if row["dice"] else float("nan")
            cells[(row["strategy"], int(row["references"]))].append(dice)
    lines = defaultdict(list)
    for (strategy, n), dice in cells.items():
        moved = [d for d in dice[1:] if d == d]
        lines[strategy].append((n, dice[0], sum(moved) / len(moved) if moved else float("nan")))
    one_shot = lines.get("one-shot", [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, column, title in ((axes[0], 1, "aligned query"), (axes[1], 2, "moved queries (mean)")):
        for strategy, points in sorted(lines.items()):
            points = sorted(points)
            if strategy == "ensemble" and one_shot:
                points = sorted(one_shot) + points
            if strategy == "one-shot":
                ax.axhline(points[0][column], color="grey", linestyle="--", label="one-shot (mean)")
                continue
            ax.plot([p[0] for p in points], [p[column] for p in points], marker="o", label=strategy)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("references (ensemble size, top-k, tuning cases)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice over the structures")
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
