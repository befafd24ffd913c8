"""Could a decoder draw a drifted policy's codes more cleanly? An oracle decoder, and the decoders given.

The rendering damage of a set of codes is eval.py's redraw_L1: each decoding against the world's renderer's
drawing of the objects read in it. The oracle is the base decoder fine-tuned towards those drawings -- a target
no reward or discriminator hands Stage 2 -- with the tokenizer's L1 on fresh real renders' ground-truth codes
beside it (1:1), so it stays a tokenizer decoder. It trains on the rollouts of the given round of every run but
the last and is measured on the last run's, with the base decoder and any decoder files given measured alike:
redraw_L1 on those codes, and rec_L1 (the tokenizer's own error) on held-out real renders' codes.

    python data/shapes/oracle_decoder.py --runs=out/study_g16_beta0/std_rl_s1,...,std_rl_s5 [--round=20]
        [--steps=600 (0: no oracle)] [--decoders=out/study_g16_beta0/ranke_s1/round_0020/decoder.safetensors,...]
"""
import os
import random
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import world  # noqa: E402
from prepare import images_of, prepare  # noqa: E402
from eval import redraw, to_u8  # noqa: E402
from model_vq import decoder_parameters, load_decoder, load_vq  # noqa: E402

VQ = "VQ-micro"  # the world's tokenizer config


def redrawn(x):
    """eval.py's redrawing of images x in [-1, 1] (as uint8) and their mean redraw_L1."""
    u8 = to_u8(x)
    drawn, l1 = redraw(u8, [world.read_objects(im) for im in u8])
    return drawn, float(l1.mean())


@torch.no_grad()
def decode(vq, codes):
    return torch.cat([vq.decode(codes[i:i + 64]) for i in range(0, len(codes), 64)])


def oracle(vq, path, codes, rng, steps, lr=1e-4, batch=32):
    """The base decoder fine-tuned: L1 to the redrawings of its own decodings of `codes`, plus L1
    reconstruction of fresh real renders of training prompts from their ground-truth codes."""
    targets = torch.from_numpy(redrawn(decode(vq, codes))[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    train_specs, _ = world.split(0)
    fit = load_vq(path, VQ).train()
    opt = torch.optim.Adam(decoder_parameters(fit), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(len(codes), (batch,), generator=gen)
        real = images_of([rng.choice(train_specs) for _ in range(batch)], rng)
        with torch.no_grad():
            real_codes = vq.encode(real)
        loss = F.l1_loss(fit.decode(codes[i]), targets[i]) + F.l1_loss(fit.decode(real_codes), real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fit.eval()


def main(runs, round_=20, steps=600, decoders=(), out="out/shapes"):
    if len(runs) < 2:
        sys.exit(f"--runs needs two or more run folders, comma-separated (the oracle trains on all but the last): {runs}")
    prepare(out)
    torch.manual_seed(0)
    path = os.path.join(out, "vq.pt")
    vq = load_vq(path, VQ)
    codes = [load_file(os.path.join(r, f"round_{round_:04d}", "rollouts.safetensors"))["codes"] for r in runs]
    train, test = torch.cat(codes[:-1]), codes[-1]
    rng = random.Random(1)
    _, held = world.split(0)
    real = images_of([rng.choice(held) for _ in range(256)], rng)
    with torch.no_grad():
        real_codes = vq.encode(real)
    print(f"real renders: redraw_L1 {redrawn(real)[1]:.5f} (the reader and renderer's own error)")
    fitted = [("base decoder", vq)]
    if steps:  # --steps=0: the decoders given alone
        fitted.append((f"oracle, {steps} steps on {len(train)} code grids", oracle(vq, path, train, rng, steps)))
    fitted += [(d, load_decoder(load_vq(path, VQ), d)) for d in decoders]
    print(f"| decoder | redraw_L1 on {len(test)} code grids of {runs[-1]} | real rec_L1 | real rec redraw_L1 |")
    print("|---|---|---|---|")
    for name, dec in fitted:
        rec = decode(dec, real_codes)
        print(f"| {name} | {redrawn(decode(dec, test))[1]:.5f} | {(rec - real).abs().mean().item():.5f} | "
              f"{redrawn(rec)[1]:.5f} |", flush=True)


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    main([r for r in args.get("runs", "").split(",") if r], int(args.get("round", 20)), int(args.get("steps", 600)),
         [d for d in args.get("decoders", "").split(",") if d], args.get("out", "out/shapes"))
