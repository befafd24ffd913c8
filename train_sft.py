"""Supervised fine-tuning of the policy: the SFT rows of Tables 2 and 4, and the start the paper implies
for RankE (the authors' release has no SFT code). Next-token cross-entropy on the ground-truth codes of
the real training images (`train_pairs`, encoded by the frozen tokenizer), with `sft_uncond` of the
captions replaced by the null caption, as LlamaGen trains, so that CFG keeps working. The decoder does
not change.

ranke.py --mode=sft runs it round after round with the round files, resume and DDP of the other modes;
a RankE run then starts from the SFT run's last round (--init_policy=out/sft/round_0010). Alone, from a
round folder, as the next round:

    python train_sft.py [RUN_CONFIG] --init_from=out/sft/round_0009 --out_dir=out/sft_stage [--sft_steps=N]
"""
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import (all_reduce_grads, autocast, caption_features, check_finite, check_weights, encode_once, grad_scaler,
                    largest_weight, load_image, load_optimizer, mean_stats, peak_memory_gb, read_pairs, reset_peak_memory,
                    rng, save_model, save_optimizer)
from model_vq import load_decoder, load_vq

# -- config: defaults for the shapes world --
sft_steps = 3  # SFT steps per round
sft_lr = 1e-4
sft_batch = 8  # image-caption pairs per forward pass
sft_chunks = 8  # forward passes per step, dealt to ranks (the world must divide it): 64 pairs a step
sft_uncond = 0.1  # captions dropped to the null caption (LlamaGen trains with 0.1)
sft_grad_clip = 1.0
init_from = ""  # standalone: the round folder to start from
SWITCHES = {}
RANGES = {"sft_steps": common.AT_LEAST_1, "sft_lr": common.POSITIVE, "sft_batch": common.AT_LEAST_1,
          "sft_chunks": common.AT_LEAST_1, "sft_uncond": common.UNIT, "sft_grad_clip": common.POSITIVE}


def check(c, world=1):
    """This stage's settings on `world` ranks: the first that cannot run, as a message; '' if none."""
    msg = common.out_of_range(c, RANGES)
    if msg:
        return msg
    if c.sft_chunks % world:
        return (f"an SFT step's {c.sft_chunks} chunks (sft_chunks) cannot be dealt evenly to {world} ranks: "
                f"set sft_chunks={common.split_hint(c.sft_chunks, world)}")
    return ""


@dataclass
class SFT:
    """The SFT stage's state, in memory from round to round."""
    policy: nn.Module
    vq: nn.Module  # the base encoder (the real images' codes) with the round's decoder (the sample grids)
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    pairs: list  # the real training images and their captions
    codes: dict = field(default_factory=dict)  # their codes, by pair, encoded once
    update: bool = True


def init(c, d):
    """The SFT stage's state from round folder d: the policy and its AdamW state, the tokenizer that
    encodes the real images (the base encoder with the round's decoder, for the sample grids), the pairs."""
    policy = common.load_policy(c, os.path.join(d, "policy.safetensors")).to(c.device)
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, "decoder.safetensors")).to(c.device)
    opt = torch.optim.AdamW(policy.parameters(), lr=c.sft_lr, betas=c.policy_betas, weight_decay=c.policy_weight_decay)
    scaler = grad_scaler(c)
    load_optimizer(opt, os.path.join(d, "opt_policy.safetensors"), scaler)
    return SFT(policy, vq.requires_grad_(False), opt, scaler, read_pairs(c.train_pairs))


def run(s, c, rnd, rank=0, world=1):
    """`sft_steps` steps of round `rnd`: each chunk draws its pairs and caption drops from (seed, round,
    step, chunk), so any world size computes the same step."""
    t0, dev = time.time(), c.device
    reset_peak_memory(dev)
    amp, C, stats = autocast(c), s.policy.config.cls_token_num, []
    start_weight = largest_weight(s.policy.parameters())
    chunks = range(rank, c.sft_chunks, world)
    bar = range(c.sft_steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} SFT", leave=False)
    for step in bar:
        for k in chunks:
            g = rng(c.seed, rnd, step, k, "sft")
            idx = torch.randint(len(s.pairs), (c.sft_batch,), generator=g).tolist()
            uncond = torch.rand(c.sft_batch, generator=g) < c.sft_uncond
            codes = encode_once(s.codes, s.vq, idx, lambda i: load_image(s.pairs[i][0], c.image_size).to(dev)).to(dev)
            cond, mask = (t.to(dev) for t in caption_features([s.pairs[i][1] for i in idx], c, C))
            with amp:
                logits = s.policy(codes, cond, mask, uncond=uncond.to(dev))
                loss = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
            check_finite(loss, "SFT loss", step)
            s.scaler.scale(loss / len(chunks)).backward()
            stats.append({"L_sft": loss.item()})
        all_reduce_grads(s.policy.parameters(), world)
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(s.policy.parameters(), c.sft_grad_clip)
        s.scaler.step(s.opt)
        s.scaler.update()
        s.opt.zero_grad(set_to_none=True)
    check_weights(s.policy.parameters(), "policy", start_weight)
    metrics = mean_stats(stats, world, dev)
    metrics.update(policy_time_s=time.time() - t0, policy_peak_gb=peak_memory_gb(dev))
    return metrics


def save(s, d):
    """The stage's state into folder d (rank 0): the policy, which is also the reference a RankE run from
    it starts with, and its AdamW state."""
    save_model(s.policy, os.path.join(d, "policy.safetensors"))
    os.link(os.path.join(d, "policy.safetensors"), os.path.join(d, "policy_ref.safetensors"))
    save_optimizer(s.opt, os.path.join(d, "opt_policy.safetensors"), s.scaler)


if __name__ == "__main__":
    common.plain_errors()
    import train_policy  # its AdamW betas and weight decay
    c = common.standalone_config(sys.modules[__name__], uses=(train_policy,))
    s = init(c, c.init_from)
    m = run(s, c, c.round)
    common.standalone_finish(c, m, lambda folder: save(s, folder))
