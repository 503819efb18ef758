#!/usr/bin/env python3
"""Times the reference PyTorch code (MASS) on one window, as the iris benches time the graphs.

The PyTorch column of `docs/benchmarks.md` ("the released size"): the same three parts as
`iris-core/benches/engine.rs` (tract) and `scripts/bench_onnxruntime.py` (onnxruntime)
time on the exported graphs, run by the authors' own code on the checkpoint the graphs
were imported from, fp32 on the CPU, no autocast, `torch.no_grad()`:

- encoder: `model.encoder(image)`, one window `[1, 1, D, H, W]`;
- task encoder: `model.encode_visual_prior(features, masks)`, K masks in one call;
- decoder: `model.decoder(features, tokens)` and `model.out` (the head), all K classes.

    /tmp/mass-venv/bin/python scripts/bench_mass.py --mass /tmp/MASS --checkpoint FILE.pth \\
        [--threads 2] [--runs 1] [--classes 1]

Prints the first run and the median of `--runs` more, then the process's peak resident
memory (`ru_maxrss`, Python, torch and the weights included). Versions as
`scripts/mass_reference.py` pins them; never run by CI.
"""

import argparse
import os
import resource
import sys

import torch

from bench_common import balls, timed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mass", required=True, help="a checkout of Stanford-AIMI/MASS at 156e866")
    parser.add_argument("--checkpoint", required=True, help="a MASS checkpoint with its config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="timed runs after the first (default 1)")
    parser.add_argument("--classes", type=int, default=1, help="classes K (default 1)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.mass))
    from models.iris import Iris

    torch.set_num_threads(args.threads)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model = Iris(**{k: v for k, v in config["model"].items() if k != "type"})
    weights = next(checkpoint[k] for k in ("ema_model", "ema_state_dict", "model", "model_state_dict")
                   if k in checkpoint)
    model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
    model.eval()
    del checkpoint, weights
    patch = config["evaluation"]["window_size"]
    image = torch.empty((1, 1, *patch)).uniform_(-1.7, 1.7, generator=torch.Generator().manual_seed(0))
    masks = torch.from_numpy(balls(args.classes, patch))
    print(f"torch {torch.__version__}, CPU, {args.threads} thread(s); window {patch}, "
          f"K = {args.classes}; first run and median of {args.runs} more")
    with torch.no_grad():
        rows = []
        first, med, features = timed(lambda: model.encoder(image), args.runs)
        rows.append(("encoder", first, med))
        stages = features[: model.num_prior_stage]
        first, med, tokens = timed(lambda: model.encode_visual_prior(stages, masks), args.runs)
        rows.append(("task encoder", first, med))

        def decode():
            out, posterior = model.decoder(features, tokens)
            return model.out(out, posterior)

        first, med, _ = timed(decode, args.runs)
        rows.append(("decoder + head", first, med))
    for name, first, med in rows:
        print(f"{name:<15} first {first:8.3f} s   median {med:8.3f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"peak RSS (ru_maxrss, Python, torch and the weights included): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
