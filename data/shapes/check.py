"""What the shapes world's measuring instruments can see, on held-out prompts (written to base/CHECK.md).

1. micro GenEval's detector (world.detect): how often it reads renders, and the base tokenizer's
   reconstructions of them, right (the prompt's spec satisfied).
2. FD's sensitivity: the FD of sets of fresh held-out renders against the evaluation's reference, clean
   (its sampling noise) and with planted damage -- Gaussian blur, colour noise, and random substitution of
   a fraction of the tokenizer's codes decoded by the frozen decoder -- each over `draws` independent sets
   of the evaluation's size (64 prompts x 4).

    python data/shapes/check.py [--out=out/shapes] [--draws=8]
"""
import json
import os
import random
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import world  # noqa: E402
from prepare import BASE, images_of, prepare  # noqa: E402
from eval import frechet, gaussian, image_features, to_u8  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from common import save_grid  # noqa: E402
from model_vq import load_vq  # noqa: E402

BLUR = (0.5, 1.0, 1.5)  # Gaussian sigma, px
NOISE = (4.0, 8.0, 16.0)  # per-pixel, per-channel Gaussian noise, sigma in 0..255 units
SUBSTITUTE = (0.0, 0.05, 0.10, 0.20)  # fraction of codes replaced by random codes (0: the reconstruction)


def blur(x, sigma):
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x)
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def substitute(vq, x, frac, gen):
    codes = vq.encode(x)
    swap = torch.rand(codes.shape, generator=gen) < frac
    codes = torch.where(swap, torch.randint(vq.config.codebook_size, codes.shape, generator=gen), codes)
    return vq.decode(codes).clamp(-1, 1)


def features_of(net, x, c, folder):
    """FD features of images B x 3 x H x W in [-1, 1], through the evaluation's own path (PNG files)."""
    paths = []
    for i, img in enumerate(x):
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        save_grid(img[None], paths[-1], 1)
    return image_features(net, paths, c)


def reader_accuracy(vq, specs, rng):
    """How often micro GenEval's detector (the rule detector world.detect) reads renders, and the
    tokenizer's reconstructions of them, right: all prompts and by kind."""
    x = images_of(specs, rng)
    with torch.no_grad():
        rec = vq.decode(vq.encode(x)).clamp(-1, 1)
    out = {}
    for name, imgs in (("renders", x), ("reconstructions", rec)):
        u8 = to_u8(imgs)
        right = [world.correct(s, world.detect(im)) for s, im in zip(specs, u8)]
        out[name] = {"all": float(np.mean(right))}
        for kind in ("single", "two", "pair"):
            out[name][kind] = float(np.mean([r for r, s in zip(right, specs) if s["kind"] == kind]))
    return out


def main(out="out/shapes", draws=8):
    prepare(out)
    torch.manual_seed(0)
    _, held = world.split(0)
    vq = load_vq(os.path.join(out, "vq.pt"), "VQ-micro")
    net = torch.jit.load(os.path.join(out, "features.pt")).eval()
    c = type("C", (), {"fid_crop": 0, "feature_size": world.SIZE})
    report = {"reader": reader_accuracy(vq, held * 8, random.Random(101))}
    # the evaluation's reference: the held-out pairs' real images, as eval.py reads them
    refs = [json.loads(line)["image"] for line in open(os.path.join(out, "heldout_pairs.jsonl"))]
    ref = gaussian(image_features(net, [os.path.join(out, p) for p in refs], c))
    settings = [("clean", None)] + [(f"blur sigma {s}", ("blur", s)) for s in BLUR] + \
        [(f"colour noise sigma {s:g}", ("noise", s)) for s in NOISE] + \
        [(f"codes substituted {f:.0%}" if f else "tokenizer reconstruction", ("sub", f)) for f in SUBSTITUTE]
    fd = {name: [] for name, _ in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(draws):
            x = images_of(held * 4, random.Random(2000 + d))
            gen = torch.Generator().manual_seed(d)
            for name, how in settings:
                with torch.no_grad():
                    y = x if how is None else blur(x, how[1]) if how[0] == "blur" else \
                        (x + torch.randn(x.shape, generator=gen) * how[1] / 127.5).clamp(-1, 1) if how[0] == "noise" else \
                        substitute(vq, x, how[1], gen)
                fd[name].append(frechet(*gaussian(features_of(net, y, c, tmp)), *ref))
    sd_clean = float(np.std(fd["clean"], ddof=1))
    report["fd"] = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)),
                           "above_clean_in_sd": (float(np.mean(v)) - float(np.mean(fd["clean"]))) / sd_clean}
                    for name, v in fd.items()}
    lines = ["# The shapes world's instruments (data/shapes/check.py)", "",
             f"Held-out prompts: {len(held)}; micro GenEval's detector read right on {len(held) * 8} images "
             f"(each prompt 8 times):", "",
             "| images | all | single | two of a kind | pair |", "|---|---|---|---|---|"]
    for name, r in report["reader"].items():
        lines.append(f"| {name} | {r['all']:.3f} | {r['single']:.3f} | {r['two']:.3f} | {r['pair']:.3f} |")
    lines += ["", f"FD against the evaluation's reference ({len(refs)} real images), sets of {len(held) * 4} fresh "
              f"renders, {draws} draws (mean, SD over draws; the SD of 'clean' is FD's sampling noise):", "",
              "| set | FD | SD | (FD - clean) / SD(clean) |", "|---|---|---|---|"]
    for name, r in report["fd"].items():
        lines.append(f"| {name} | {r['mean']:.2f} | {r['sd']:.2f} | {r['above_clean_in_sd']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    return report, text


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    report, text = main(args.get("out", "out/shapes"), int(args.get("draws", 8)))
    atomic_write(os.path.join(BASE, "CHECK.md"), text)
