"""A space-to-depth stem for tflite-int8: build the files that benchmarks/notes.md (session 25) times.

SqueezeNet 1.0's 7x7/2 stem conv over 3 input channels equals a 2x2 space-to-depth
(``nn.PixelUnshuffle(2)``: 224x224x3 -> 112x112x12) followed by a 4x4/1 conv over 12 channels
with the weights rearranged (``W'[o, 4c + 2dy + dx, a, b] = W[o, c, 2a + dy, 2b + dx]``, zero
where ``2a + dy`` or ``2b + dx`` passes the kernel). XNNPACK's int8 kernels take input
channels in blocks of 8, so the plain stem pads 3 to 8 and the rewritten one 12 to 16.

This script exports a model's tflite-int8 file twice, with the plain and the rewritten stem
(nearest rounding, given float layers), plus the rewritten fp32 file, for
``benchmarks/int8_speed.py`` (``--stage time`` / ``--stage instructions``). Speed only: the
export pipeline does not offer the rewrite yet (GPTQ, the packer and the accuracy checks do
not know it), so the files' accuracy is not a recipe's.

    python benchmarks/space_to_depth_stem.py runs/470k/model.esq --out runs/s2d \\
        --float-layers features.3 classifier.3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def space_to_depth_conv(conv):
    """``nn.Sequential(PixelUnshuffle(2), Conv2d(4C, O, ceil(k / 2)))`` computing what ``conv``
    (stride 2, no padding, no groups, square kernel) computes."""
    import torch
    from torch import nn

    if conv.stride != (2, 2) or conv.padding != (0, 0) or conv.groups != 1 or conv.dilation != (1, 1):
        raise SystemExit(f"{conv}: only a stride-2 conv without padding, groups or dilation")
    w = conv.weight.detach()
    o, c, k, k2 = w.shape
    if k != k2:
        raise SystemExit(f"{conv}: only a square kernel")
    kk = (k + 1) // 2
    w2 = torch.zeros(o, 4 * c, kk, kk, dtype=w.dtype)
    for dy in range(2):
        for dx in range(2):
            part = w[:, :, dy::2, dx::2]  # taps 2a + dy, 2b + dx
            w2[:, dy * 2 + dx::4, :part.shape[2], :part.shape[3]] = part
    new = nn.Conv2d(4 * c, o, kk, 1, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w2)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return nn.Sequential(nn.PixelUnshuffle(2), new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a model file edgesqueeze loads (an .esq, a checkpoint)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stem", default="features.0", help="the stem conv's module name")
    ap.add_argument("--float-layers", nargs="*", default=[])
    ap.add_argument("--data", default="imagenet-sample")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--images", type=int, default=50)
    args = ap.parse_args()

    import torch

    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.config.export import CalibrationConfig
    from edgesqueeze.data import load_dataset
    from edgesqueeze.export._common import calibration_images
    from edgesqueeze.export.tflite import export_tflite, export_tflite_int8

    loaded = load_model(args.model)
    model, meta = loaded.model.eval(), loaded.meta
    ds = load_dataset(args.data, data_dir=args.data_dir)
    pool = ds.train_x if len(ds.train_x) else ds.test_x
    images = calibration_images(pool, args.images, seed=0)
    parent_name, _, leaf = args.stem.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    stem = model.get_submodule(args.stem)
    x = torch.randn(2, *meta["input_shape"])
    ref = model(x)
    args.out.mkdir(parents=True, exist_ok=True)
    kw = {"calibration": CalibrationConfig(images=args.images, method="minmax"),
          "float_layers": args.float_layers, "weight_rounding": "nearest"}
    export_tflite_int8(model, meta, args.out / "plain.int8.tflite", images, **kw)
    setattr(parent, leaf, space_to_depth_conv(stem))
    diff = (model(x) - ref).abs().max().item()
    print(f"rewritten stem: largest output difference {diff:.2e} (float rounding)")
    export_tflite_int8(model, meta, args.out / "s2d.int8.tflite", images, **kw)
    export_tflite(model, meta, args.out / "s2d.tflite")
    print(f"wrote {args.out}/plain.int8.tflite, s2d.int8.tflite, s2d.tflite")


if __name__ == "__main__":
    main()
