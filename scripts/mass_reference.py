#!/usr/bin/env python3
"""Reference outputs of the authors' Iris code (MASS) for the importer's parity tests.

`iris-train import` reads the released PyTorch checkpoints (`mass_base.pth`). The tests
prove that the imported model computes what the reference code computes, without Python
in CI: this script builds the reference `Iris` at a reduced width with MASS's own code,
perturbs every parameter, saves it in the layout MASS's trainer saves and records the
reference outputs next to it. Run it once to regenerate the committed fixture:

    python3 -m venv /tmp/mass-venv
    /tmp/mass-venv/bin/pip install torch==2.15.0 numpy==2.4.6 einops==0.8.2 pyyaml==6.0.4
    git clone https://github.com/Stanford-AIMI/MASS /tmp/MASS && git -C /tmp/MASS checkout 156e866
    /tmp/mass-venv/bin/python scripts/mass_reference.py --mass /tmp/MASS

It writes `iris-train/tests/fixtures/mass/` (gzip-compressed, about 6 MB):
- `checkpoint.pth.gz`: `{model, ema_model, config, epoch, iteration, optimizer, scheduler,
  best_metric}` exactly as `utils/checkpoint.py` assembles it, `model` and `ema_model`
  different; channels [4, 8, 32, 32, 32] (the three task levels need 32 channels: one
  head of 32), two blocks per stage, a non-cubic window [32, 48, 32], positional
  embeddings stored at [48, 64, 48] (the release stores 128^3; the reference slices them
  to the window from the origin, as the importer must). Weights are rounded to
  4 significant bits (stored and computed as f32) so that the file compresses.
- `reference.pth.gz`: the inputs (a reference image with two masks, a query image with
  two target masks); for the EMA weights the task tokens of each level and the logits of
  both classes decoded in one decoder run (fp32, CPU, eval mode); for the raw weights the
  task tokens and one training step's loss (BinaryDiceLoss + BinaryCrossEntropyLoss, the
  pretraining config's two losses with weight 1), every parameter's gradient norm and
  the full gradients of one tensor of each kind of layer.
- `refused-*.pth`: three small checkpoints the importer must refuse (a missing tensor, a
  wrong shape, an unsupported block type).

With `--checkpoint FILE.pth` it instead records one window of a real checkpoint (e.g.
`mass_base.pth`, EMA weights, window 128^3) into `--out`, for
`IRIS_MASS_CHECKPOINT=FILE.pth IRIS_MASS_REFERENCE=DIR/reference.pth cargo test -p
iris-train --release --test import -- --ignored`.

With `--full-size FILE.pth` it writes a checkpoint of the released size and layout
(the pretraining config unchanged: channels 32-512, 128^3, 120,126,373 parameters) with
freshly initialised weights, stripped to `{ema_model, config, epoch, iteration}`: a
stand-in for `mass_base.pth` (which cannot be downloaded here) for the released-size
checks and `docs/benchmarks.md`.
"""

import argparse
import copy
import gzip
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

PINNED = {"torch": "2.15.0"}
MASS_COMMIT = "156e866"
CHANNELS = [4, 8, 32, 32, 32]
WINDOW = [32, 48, 32]
STORED_POSITION = [48, 64, 48]
CLASSES = 2
# One tensor per kind of layer whose full gradient the fixture keeps.
GRADIENT_KEYS = [
    "encoder.inc.conv1.weight",
    "encoder.down2.conv.1.shortcut.conv.weight",
    "encoder.down4.conv.2.conv2.conv.weight",
    "task_embedding.0.task_query",
    "task_embedding.0.expand.2.bias",
    "task_embedding.1.merge.2.weight",
    "task_embedding.2.squeeze.2.weight",
    "task_embedding.1.pos_embed.embedding",
    "task_embedding.0.attn_layers.1.query_aggregate_block.fn.mha.in_proj_weight",
    "task_embedding.2.attn_layers.0.query_ffn_1.fn.fc1.weight",
    "task_embedding.2.norm_foreground.weight",
    "decoder.prior_fuse.0.attn_layers.1.prior_attn_block.fn.mha.in_proj_bias",
    "decoder.prior_fuse.2.attn_layers.0.feat_aggregate_block.norm2.weight",
    "decoder.prior_fuse.1.attn_layers.0.feat_ffn.fn.fc2.weight",
    "decoder.prior_fuse.2.attn_layers.1.prior_aggregate_block.fn.mha.out_proj.weight",
    "decoder.up1.conv.0.shortcut.conv.weight",
    "decoder.up4.conv.1.conv1.conv.weight",
    "out.norm.weight",
    "out.classifier_pred.0.fc1.weight",
    "out.classifier_pred.1.fc2.bias",
]


def coarse(x, bits=4):
    """`x` rounded to `bits` significant bits: still f32, but the file compresses
    three to one."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent)


def perturb(model, generator, scale):
    """Moves every parameter off its initial value (LayerNorm scales, zero biases
    included), rounded to a few significant bits so the file compresses."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            spread = p.std().item() if p.numel() > 1 else 0.0
            if spread == 0.0:
                spread = 0.2 if name.endswith("weight") else 0.05
            noise = torch.randn(p.shape, generator=generator) * spread * scale
            p.copy_(coarse(p + noise))


def blobs(generator, count, shape):
    """`count` binary ellipsoids at random places, [1, count, D, H, W]."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape],
                                      indexing="ij"))
    masks = []
    for _ in range(count):
        centre = torch.tensor([s * (0.25 + 0.5 * torch.rand(1, generator=generator).item())
                               for s in shape]).view(3, 1, 1, 1)
        radius = torch.tensor([s * (0.12 + 0.1 * torch.rand(1, generator=generator).item())
                               for s in shape]).view(3, 1, 1, 1)
        masks.append((((grid - centre) / radius) ** 2).sum(0) <= 1.0)
    return torch.stack(masks).unsqueeze(0).float()


def image(generator, masks):
    """A smooth image in which the masked structures are brighter, z-scored."""
    noise = torch.randn((1, 1, *masks.shape[2:]), generator=generator)
    smooth = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)
    x = smooth * 3.0 + (masks * torch.tensor([1.5, -1.0])[: masks.shape[1]].view(1, -1, 1, 1, 1)).sum(1, keepdim=True)
    return coarse((x - x.mean()) / x.std(), 6)


def record(model, prefix, ref_img, ref_masks, query, out, logits=True):
    model.eval()
    with torch.no_grad():
        features = model.encoder(ref_img)
        tokens = model.encode_visual_prior(features[: model.num_prior_stage], ref_masks)
        decoded = model.forward_with_encoded_prior(query, tokens)
    for i, t in enumerate(tokens):
        out[f"{prefix}.task.{i}"] = t.contiguous()
    if logits:
        out[f"{prefix}.logits"] = decoded.contiguous()


def mass_module(mass, path):
    """A module of the MASS checkout loaded from its file, without its package's
    `__init__` (which imports the trainers and their tensorboard, h5py, SimpleITK...)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), os.path.join(mass, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_step(model, ref_img, ref_masks, query, query_masks, out, mass):
    losses = mass_module(mass, "metrics/losses.py")
    BinaryDiceLoss, BinaryCrossEntropyLoss = losses.BinaryDiceLoss, losses.BinaryCrossEntropyLoss

    model.train()
    model.zero_grad()
    logits = model(query, ref_img, ref_masks)
    dice = BinaryDiceLoss()(logits, query_masks)
    bce = BinaryCrossEntropyLoss()(logits, query_masks)
    loss = dice + bce
    loss.backward()
    out["train.loss"] = loss.detach().reshape(1)
    out["train.dice"] = dice.detach().reshape(1)
    out["train.bce"] = bce.detach().reshape(1)
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        out[f"train.grad_norm.{name}"] = grad.norm().reshape(1)
        if name in GRADIENT_KEYS:
            out[f"train.grad.{name}"] = grad.contiguous()


def save_gz(obj, path):
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "file.pth")
        torch.save(obj, raw)
        with open(raw, "rb") as src, gzip.GzipFile(path, "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)


def refused(out):
    """Three small checkpoints the importer must refuse, each naming the key: a bare
    state_dict missing a tensor, one with a tensor of the wrong shape, and a training
    checkpoint whose config asks for a block type the model does not have."""
    sizing = {"encoder.inc.conv1.weight": torch.ones(1, 1, 3, 3, 3),
              "task_embedding.0.task_query": torch.ones(10, 1)}
    for i in range(1, 5):
        sizing[f"encoder.down{i}.conv.1.conv1.conv.weight"] = torch.ones(1, 1, 3, 3, 3)
    torch.save(sizing, os.path.join(out, "refused-missing.pth"))
    torch.save({**sizing, "encoder.inc.conv1.weight": torch.ones(1, 1, 3, 3, 5)},
               os.path.join(out, "refused-shape.pth"))
    config = {"model": {"type": "iris", "in_ch": 1, "channels": [1, 1, 1, 1, 1], "block": "Bottleneck"}}
    torch.save({"model": sizing, "config": config, "epoch": 0},
               os.path.join(out, "refused-block.pth"))


def fixture(args):
    import yaml
    from models.iris import Iris
    Lamb = mass_module(args.mass, "training/lamb_optimizer.py").Lamb

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    with open(os.path.join(args.mass, "config/pretrain/mask_guided_self_supervised.yaml")) as f:
        config = yaml.safe_load(f)
    config["model"].update(channels=CHANNELS, tn=3)
    config["training_size"] = list(WINDOW)
    config["evaluation"]["window_size"] = list(WINDOW)
    model_kwargs = {k: v for k, v in config["model"].items() if k != "type"}

    model = Iris(**model_kwargs)
    for stage in model.task_embedding:
        # The reference slices the embedding from the origin; a smaller stored one keeps the
        # fixture small and still makes the importer slice.
        d, h, w = STORED_POSITION
        stage.pos_embed.embedding = torch.nn.Parameter(stage.pos_embed.embedding[:, :, :d, :h, :w].clone())
    perturb(model, generator, 0.5)
    ema = copy.deepcopy(model)
    perturb(ema, generator, 0.3)

    optimizer = Lamb(model.parameters(), lr=config["optimizer"]["lr"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=10)
    state = {
        "model": model.state_dict(),
        "epoch": 3,
        "iteration": 3000,
        "optimizer": optimizer.state_dict(),
        "ema_model": ema.state_dict(),
        "best_metric": 0.5,
        "config": config,
        "scheduler": scheduler.state_dict(),
    }

    ref_masks = blobs(generator, CLASSES, WINDOW)
    query_masks = blobs(generator, CLASSES, WINDOW)
    ref_img = image(generator, ref_masks)
    query = image(generator, query_masks)
    out = {
        "reference_image": ref_img,
        "reference_masks": ref_masks,
        "query_image": query,
        "query_masks": query_masks,
    }
    record(ema, "ema", ref_img, ref_masks, query, out)
    record(model, "model", ref_img, ref_masks, query, out, logits=False)
    training_step(model, ref_img, ref_masks, query, query_masks, out, args.mass)

    os.makedirs(args.out, exist_ok=True)
    save_gz(state, os.path.join(args.out, "checkpoint.pth.gz"))
    save_gz(out, os.path.join(args.out, "reference.pth.gz"))
    refused(args.out)
    for name in ("checkpoint.pth.gz", "reference.pth.gz"):
        size = os.path.getsize(os.path.join(args.out, name))
        print(f"wrote {os.path.join(args.out, name)} ({size / 1e6:.2f} MB)")


def full_size(args):
    """A checkpoint of the released size with random weights (EMA copy only)."""
    import yaml
    from models.iris import Iris

    torch.manual_seed(0)
    with open(os.path.join(args.mass, "config/pretrain/mask_guided_self_supervised.yaml")) as f:
        config = yaml.safe_load(f)
    model = Iris(**{k: v for k, v in config["model"].items() if k != "type"})
    state = {"ema_model": model.state_dict(), "config": config, "epoch": 0, "iteration": 0}
    torch.save(state, args.full_size)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.full_size}: {parameters:,} parameters, {len(state['ema_model'])} tensors")


def released(args):
    """One window of a real checkpoint (EMA weights, as inference.py loads them)."""
    from models.iris import Iris

    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    model = Iris(**{k: v for k, v in config["model"].items() if k != "type"})
    weights = next(checkpoint[k] for k in ("ema_model", "ema_state_dict", "model", "model_state_dict")
                   if k in checkpoint)
    model.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
    generator = torch.Generator().manual_seed(1)
    window = config["evaluation"]["window_size"]
    ref_masks = blobs(generator, CLASSES, window)
    query_masks = blobs(generator, CLASSES, window)
    out = {
        "reference_image": image(generator, ref_masks),
        "reference_masks": ref_masks,
        "query_image": image(generator, query_masks),
        "query_masks": query_masks,
    }
    record(model, "ema", out["reference_image"], ref_masks, out["query_image"], out)
    os.makedirs(args.out, exist_ok=True)
    torch.save(out, os.path.join(args.out, "reference.pth"))
    print(f"wrote {os.path.join(args.out, 'reference.pth')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mass", required=True, help=f"a checkout of Stanford-AIMI/MASS at {MASS_COMMIT}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..",
                                                      "iris-train/tests/fixtures/mass"))
    parser.add_argument("--checkpoint", help="record one window of this real checkpoint instead")
    parser.add_argument("--full-size", help="write a random checkpoint of the released size here instead")
    args = parser.parse_args()
    if torch.__version__.split("+")[0] != PINNED["torch"]:
        sys.exit(f"torch {PINNED['torch']} is pinned, found {torch.__version__}")
    sys.path.insert(0, os.path.abspath(args.mass))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    np.random.seed(0)
    if args.full_size:
        full_size(args)
    elif args.checkpoint:
        released(args)
    else:
        fixture(args)


if __name__ == "__main__":
    main()
