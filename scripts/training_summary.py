#!/usr/bin/env python3
"""Summarise an iris-train run's metrics.csv per block of steps.

    scripts/training_summary.py RUN/metrics.csv [--block 1000] > models/NAME/training.csv

Writes one row per block of `--block` steps: the steps, the mean loss and mean
train Dice over the block, and the held-out Dice and learning rate at the block's
last step (the held-out Dice of the last evaluation in the block; empty when none
ran). Standard library only.
"""
import argparse
import csv
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="metrics.csv written by iris-train train")
    parser.add_argument("--block", type=int, default=1000, help="steps per row")
    args = parser.parse_args()
    if args.block < 1:
        parser.error("--block must be at least 1")

    blocks = {}
    with open(args.metrics, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            block = blocks.setdefault((step - 1) // args.block, [])
            block.append(row)

    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["steps", "mean_loss", "mean_train_dice",
                  "held_out_dice_at_end", "learning_rate_at_end"])
    for index in sorted(blocks):
        rows = blocks[index]
        first = index * args.block + 1
        last = int(rows[-1]["step"])
        loss = sum(float(r["loss"]) for r in rows) / len(rows)
        dice = sum(float(r["dice"]) for r in rows) / len(rows)
        evals = [r["eval_dice"] for r in rows if r["eval_dice"]]
        out.writerow([f"{first}-{last}", f"{loss:.4f}", f"{dice:.4f}",
                      evals[-1] if evals else "", rows[-1]["lr"]])


if __name__ == "__main__":
    main()
