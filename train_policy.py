"""Stage 1 of RankE: GRPO on the policy with the decoder frozen (Eq. 3).

Per step (`rollout`, then `ppo_epoch` `ppo_epochs` times): a batch of prompts, G rollouts each from the
KV-cached CFG sampler, decoded by the frozen decoder, scored, ranked into group advantages; then clipped
updates over those rollouts, each followed by the EMA update of pi_ref. pi_old is epoch 1's own forward. Where the authors'
released code does otherwise (conditional-only log-probs, k2 KL to a fixed reference, rewards of the
EMA decoder's images), a switch below says so; config/released.py sets them all.

ranke.py keeps this stage's state (`init`) in memory across rounds and calls `run` once a round; the
stages hand over plain safetensors files (this stage's rollouts, the other stage's decoder). Alone,
this script runs Stage 1 from a round folder and writes the policy, pi_ref, their optimizer state and
the rollouts into a new folder (the paper's Std. RL is `python ranke.py --mode=policy_only`):

    python train_policy.py [RUN_CONFIG] --init_from=out/ranke/round_0009 --out_dir=out/stage1 [--policy_steps=N]

with the settings at the top of this file (and common.py's), as the loop runs them; give the run's config
file as the loop was given it.
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

import common
from checkpoint import atomic_save
from common import (AT_LEAST_1, BETAS, NON_NEGATIVE, POSITIVE, UNIT, all_gather, all_reduce_grads, autocast, bad_switch,
                    caption_features, check_finite, check_weights, grad_scaler, largest_weight, load_optimizer,
                    mean_stats, out_of_range, peak_memory_gb, read_prompts, reset_peak_memory, rng, save_model,
                    save_optimizer, split_hint)
from losses import ema_update, group_advantages, grpo_loss, run_reward
from model_ar import decode_one_token, generate, token_logprobs
from model_vq import load_decoder, load_vq

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and this project reconstructs. --
policy_steps = 3  # GRPO steps per round
policy_lr = 1e-4  # the shapes world's 8 prompts (5e-5: no gain a person sees in 10 rounds); LlamaGen-XL: 1e-6 (r)
policy_weight_decay = 0.01
policy_betas = (0.9, 0.999)
prompts_per_step = 8  # global batch of prompts per GRPO step, each with group_size rollouts
prompts_per_chunk = 1  # prompts per forward pass; a chunk is also the unit of seeding and of dealing to
#                        ranks, so the step's chunks (8 here) must divide among the ranks: 1, 2, 4 or 8
ppo_epochs = 2  # clipped updates per rollout batch (with one, the ratio is always 1 and clip never acts)
clip_eps = 0.2
beta = 0.05  # KL coefficient
ref_decay = 0.99  # EMA decay of pi_ref (r); 1.0 = a fixed copy of the base policy (the release)
ref_update_every = 1  # policy updates between pi_ref's EMA updates
kl_estimator = "k3"  # 'k3' q/p - log(q/p) - 1 (the paper) | 'k2' (log p - log q)^2 / 2 (the release)
cfg_scale = 1.5  # CFG during rollouts; LlamaGen-XL: 7.5 (r). GPT-micro: above 2, its codes leave the real ones (docs/shapes_world.md)
temperature = 1.0
top_k = 0
top_p = 0.9
logprob = "sampler"  # the ratio's log-prob: 'sampler' (the guided, filtered distribution that drew the token) |
#                      'cond_only' (the conditional logits' full softmax: published baselines, the release)
old_logprobs = "recompute"  # pi_old: 'recompute' (epoch 1's training forward, detached: its ratio is exactly 1, and
#                             no extra pass) | 'sampler' (recorded while sampling: in bf16 up to 5% of tokens start outside the clip)
sample_batch = 0  # prompts per sampler call on a rank (a multiple of prompts_per_chunk); 0: all of the rank's
#                   prompts of a step in one call. Its KV cache is 2 x layers x rows x (120 + 256) x dim x 2 B
compile_sampler = False  # torch.compile the sampler's decode step (CUDA graphs on CUDA, inductor elsewhere); its KV
#                          cache then stays allocated from step to step (graphs replay on fixed addresses), training included
grad_checkpoint = False  # activation checkpointing of the policy's training forward: each block recomputed in the
#                         backward (one more forward of FLOPs; bench.py --mode=memory counts what it saves)
policy_grad_clip = 1.0
reward_decoder = "decoder"  # decodes rollouts for the reward: 'decoder' (Stage 2's latest) | 'ema' (its EMA: the release)
init_from = ""  # standalone: the round folder to start from
SWITCHES = {"logprob": ("sampler", "cond_only"), "old_logprobs": ("recompute", "sampler"),
            "kl_estimator": ("k3", "k2"), "reward_decoder": ("decoder", "ema")}
RANGES = {"policy_steps": AT_LEAST_1, "policy_lr": POSITIVE, "policy_weight_decay": NON_NEGATIVE, "policy_betas": BETAS,
          "prompts_per_step": AT_LEAST_1, "prompts_per_chunk": AT_LEAST_1, "sample_batch": NON_NEGATIVE,
          "ppo_epochs": AT_LEAST_1, "clip_eps": (lambda v: 0 < v < 1, "within (0, 1)"), "beta": NON_NEGATIVE,
          "ref_decay": UNIT, "ref_update_every": AT_LEAST_1, "cfg_scale": (lambda v: v >= 1, ">= 1 (1: no guidance)"),
          "temperature": POSITIVE, "top_k": (lambda v: v >= 0, ">= 0 (0, or the codebook's size and above: no filter)"),
          "top_p": (lambda v: 0 < v <= 1, "within (0, 1]"),
          "policy_grad_clip": POSITIVE}


def check(c, world=1):
    """This stage's settings on `world` ranks: the first that cannot run, as a message saying how to fix
    it; '' if none (ranke.py and this script alone run the same checks)."""
    msg = bad_switch(c, SWITCHES) or out_of_range(c, RANGES)
    if msg:
        return msg
    if c.logprob == "cond_only" and c.old_logprobs == "sampler":
        return ("logprob=cond_only needs old_logprobs=recompute: the sampler's log-probs are of the guided "
                "distribution, so the PPO ratio would compare two different distributions")
    if c.prompts_per_step % c.prompts_per_chunk:
        return f"prompts_per_step ({c.prompts_per_step}) must be a multiple of prompts_per_chunk ({c.prompts_per_chunk})"
    if c.sample_batch % c.prompts_per_chunk:
        return (f"sample_batch ({c.sample_batch}) must be 0 (all of a rank's prompts in one sampler call) or a "
                f"multiple of prompts_per_chunk ({c.prompts_per_chunk})")
    n = c.prompts_per_step // c.prompts_per_chunk
    if n % world:
        fits = [k for k in range(c.prompts_per_chunk, 0, -1)
                if c.prompts_per_step % k == 0 and (c.prompts_per_step // k) % world == 0]
        return (f"a GRPO step's {n} prompt chunks (prompts_per_step {c.prompts_per_step} / prompts_per_chunk "
                f"{c.prompts_per_chunk}) cannot be dealt evenly to {world} ranks: set "
                + (f"prompts_per_chunk={fits[0]} or " if fits else "")
                + f"prompts_per_step={split_hint(n, world) * c.prompts_per_chunk}")
    prompts = read_prompts(c.train_prompts)
    if len(prompts) < c.prompts_per_step:
        return f"{c.train_prompts} has {len(prompts)} prompts, fewer than prompts_per_step ({c.prompts_per_step})"
    return ""


@dataclass
class Policy:
    """Stage 1's state, in memory from round to round."""
    policy: nn.Module  # pi_theta
    vq: nn.Module  # the frozen decoder that turns rollouts into images for the reward
    reward: Callable  # R(images, prompts)
    prompts: list  # the training prompts; rollouts name them by index
    decode_fn: Callable = decode_one_token  # the sampler's decode step (compiled with compile_sampler)
    update: bool = True  # False: rollouts only (decoder_only)
    ref: nn.Module = None  # pi_ref, an EMA of pi_theta
    opt: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None


@dataclass
class Rollouts:
    """A prompt chunk's rollouts in a GRPO step: G samples of each of its prompts, scored and ranked."""
    k: int  # the chunk's index in the step (its seed)
    ids: torch.Tensor  # the prompt of each row
    cond: torch.Tensor  # caption features ...
    mask: torch.Tensor  # ... and their mask
    codes: torch.Tensor  # the sampled image tokens
    texts: list
    rewards: torch.Tensor = None
    logp_ref: torch.Tensor = None  # pi_ref's log-probs (None when the policy is not updated)
    logp_old: torch.Tensor = None  # pi_old's: the sampler's record, or epoch 1's forward (set in ppo_epoch)
    advantages: torch.Tensor = None  # Eq. 3's group advantages
    flat: torch.Tensor = None  # groups whose rewards are all equal


def init(c, d, reward, update=True):
    """Stage 1's state from round folder d: the policy, pi_ref and their AdamW state (when the stage
    updates the policy), and the frozen decoder that turns rollouts into images for the reward."""
    dev = c.device
    policy = common.load_policy(c, os.path.join(d, "policy.safetensors")).to(dev)
    policy.grad_checkpoint = c.grad_checkpoint
    decoder_file = "decoder.safetensors" if c.reward_decoder == "decoder" else "decoder_ema.safetensors"
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, decoder_file)).to(dev).requires_grad_(False)
    s = Policy(policy, vq, reward, read_prompts(c.train_prompts), update=update)
    if c.compile_sampler:
        s.decode_fn = torch.compile(decode_one_token, mode="reduce-overhead" if dev.startswith("cuda") else None,
                                    fullgraph=True)
    if update:
        s.ref = common.load_policy(c, os.path.join(d, "policy_ref.safetensors")).to(dev).requires_grad_(False)
        s.opt = torch.optim.AdamW(policy.parameters(), lr=c.policy_lr, betas=c.policy_betas,
                                  weight_decay=c.policy_weight_decay)
        s.scaler = grad_scaler(c)
        load_optimizer(s.opt, os.path.join(d, "opt_policy.safetensors"), s.scaler)
    else:
        policy.requires_grad_(False)
    return s


def set_decoder(s, path):
    """The hand-over from Stage 2: the decoder (or its EMA, as reward_decoder says) that decodes the next
    rollouts for the reward."""
    load_decoder(s.vq, path)


def sampling(c):
    return dict(cfg_scale=c.cfg_scale, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)


def rollout(s, c, rnd, step, rank=0, world=1):
    """This rank's rollouts of a GRPO step: its prompt chunks, G samples each, drawn in sampler calls of
    `sample_batch` prompts (every chunk from its own seeded stream, so the same on any world size), decoded
    by the frozen decoder and scored, ranked into group advantages (Eq. 3), with pi_ref's log-probs."""
    dev, amp, G, C = c.device, autocast(c), c.group_size, s.policy.config.cls_token_num
    n_chunks = c.prompts_per_step // c.prompts_per_chunk
    order = torch.randperm(len(s.prompts), generator=rng(c.seed, rnd, step))[:c.prompts_per_step].view(n_chunks, -1)
    mine = list(range(rank, n_chunks, world))
    per_call = len(mine) if c.sample_batch == 0 else c.sample_batch // c.prompts_per_chunk
    chunks = []
    for first in range(0, len(mine), per_call):
        ks = mine[first:first + per_call]
        ids = order[ks].flatten().repeat_interleave(G)
        texts = [s.prompts[i] for i in ids]
        cond, mask = (t.to(dev) for t in caption_features(texts, c, C))
        gens = [torch.Generator(dev).manual_seed(rng(c.seed, rnd, step, k).initial_seed()) for k in ks]
        with torch.no_grad(), amp:
            codes, logp_sampler = generate(s.policy, cond, mask, generator=gens, return_logprobs=True,
                                           decode_fn=s.decode_fn, **sampling(c))
        if not c.compile_sampler:
            s.policy.free_cache()  # its memory goes to the training forward
        n = c.prompts_per_chunk * G
        for k, rows in zip(ks, torch.arange(len(ids)).split(n)):
            r = Rollouts(k, ids[rows], cond[rows], mask[rows], codes[rows], [texts[i] for i in rows])
            with torch.no_grad(), amp:
                r.rewards = s.reward(s.vq.decode(r.codes), r.texts).float()
                r.logp_ref = token_logprobs(s.ref, r.codes, r.cond, r.mask, **sampling(c),
                                            cond_only=c.logprob == "cond_only")[0] if s.update else None
            # pi_old: the sampler's record, or (recompute) epoch 1's own training forward, taken in ppo_epoch
            r.logp_old = logp_sampler[rows].float() if c.old_logprobs == "sampler" else None
            r.advantages, r.flat = group_advantages(r.rewards, G)
            chunks.append(r)
    return chunks


def ppo_epoch(s, c, chunks, rnd, step, epoch, world=1):
    """One clipped update of the policy on a step's rollouts (Eq. 3), their gradients accumulated over
    the chunks and averaged over ranks, then the EMA update of pi_ref. Returns the chunks' statistics."""
    n_tokens = c.prompts_per_step * c.group_size * c.block_size / world  # see grpo_loss: global tokens / world
    stats = []
    for r in chunks:
        with autocast(c):
            logp, entropy = token_logprobs(s.policy, r.codes, r.cond, r.mask, **sampling(c),
                                           cond_only=c.logprob == "cond_only")
            if r.logp_old is None:  # nothing has updated the policy before epoch 1's last chunk: this forward
                r.logp_old = logp.detach()  # is pi_old, bit for bit what a no-grad recompute gives (ratio 1)
            loss, st = grpo_loss(logp, r.logp_old, r.logp_ref, r.advantages, c.clip_eps, c.beta, n_tokens,
                                 entropy, c.kl_estimator)
        check_finite(loss, "GRPO loss", step)
        s.scaler.scale(loss).backward()
        # per epoch: in the first, how far pi_old is from the training forward (ratio ~1); then the clip's work
        stats.append({**{f"{k}_epoch{epoch}": st[k] for k in ("clip_frac", "ratio_dev", "ratio_max")},
                      **({"kl": st["kl"], "entropy": st["entropy"]} if epoch == 1 else {})})
    all_reduce_grads(s.policy.parameters(), world)
    s.scaler.unscale_(s.opt)
    torch.nn.utils.clip_grad_norm_(s.policy.parameters(), c.policy_grad_clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)  # no gradients are held between updates, nor while Stage 2 runs
    update = ((rnd - 1) * c.policy_steps + step) * c.ppo_epochs + epoch  # over the whole run, from 1
    if update % c.ref_update_every == 0:
        ema_update(s.ref, s.policy, c.ref_decay)
    return stats


def run(s, c, rnd, rank=0, world=1):
    """`policy_steps` GRPO steps of round `rnd` (only draws and scores rollouts if not s.update).
    Returns the rollouts of every rank in chunk order (the same on any world size) and the metrics."""
    t0, dev = time.time(), c.device
    reset_peak_memory(dev)
    n_chunks = c.prompts_per_step // c.prompts_per_chunk
    stats, saved = [], {"codes": [], "rewards": [], "prompt_ids": [], "chunk": []}
    start_weight = largest_weight(s.policy.parameters())
    bar = range(c.policy_steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 1 (GRPO)", leave=False)
    for step in bar:
        chunks = rollout(s, c, rnd, step, rank, world)
        for epoch in range(1, c.ppo_epochs + 1 if s.update else 0):
            stats += ppo_epoch(s, c, chunks, rnd, step, epoch, world)
        stats.append({"reward": torch.cat([r.rewards for r in chunks]).mean().item(),
                      "zero_adv_groups": sum(r.flat for r in chunks) / len(chunks)})
        for r in chunks:
            for key, v in zip(saved, (r.codes, r.rewards, r.ids, torch.full_like(r.ids, step * n_chunks + r.k))):
                saved[key].append(v.cpu())
    check_weights(s.policy.parameters(), "policy", start_weight)
    metrics = mean_stats(stats, world, dev)
    out = {k: all_gather(torch.cat(v).to(dev), world).cpu() for k, v in saved.items()}
    order = out.pop("chunk").argsort(stable=True)
    metrics.update(policy_time_s=time.time() - t0, policy_peak_gb=peak_memory_gb(dev))
    return {k: v[order] for k, v in out.items()}, metrics


def save(s, d):
    """The stage's state into folder d (rank 0): the policy, pi_ref and their AdamW state."""
    save_model(s.policy, os.path.join(d, "policy.safetensors"))
    save_model(s.ref, os.path.join(d, "policy_ref.safetensors"))
    save_optimizer(s.opt, os.path.join(d, "opt_policy.safetensors"), s.scaler)


def save_rollouts(rollouts, c, rnd, path):
    """The hand-over to Stage 2, tagged with the run and the prompt file (rollouts name prompts by index)."""
    meta = {"run_id": c.run_id, "round": str(rnd), "prompts_sha1": c.prompts_sha1}
    atomic_save(rollouts, path, meta)


def write(s, rollouts, c, rnd, d):
    save(s, d)
    save_rollouts(rollouts, c, rnd, os.path.join(d, "rollouts.safetensors"))


if __name__ == "__main__":
    common.plain_errors()
    c = common.standalone_config(sys.modules[__name__])
    s = init(c, c.init_from, run_reward(c))
    rollouts, m = run(s, c, c.round)
    common.standalone_finish(c, m, lambda folder: write(s, rollouts, c, c.round, folder))
