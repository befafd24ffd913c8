"""Stage 1 of RankE: GRPO on the policy with the decoder frozen (Eq. 3).

Per step: a batch of prompts, G rollouts each from the KV-cached CFG sampler (with their pi_old
log-probs), decoded by the frozen decoder, scored, ranked into group advantages; then `ppo_epochs`
clipped updates over those rollouts, each followed by the EMA update of pi_ref. Where the authors'
released code does otherwise (conditional-only log-probs, k2 KL to a fixed reference, rewards of the
EMA decoder's images), a switch below says so; config/released.py sets them all.

ranke.py keeps this stage's state (`init`) in memory across rounds and calls `run` once a round; the
stages hand over plain safetensors files (this stage's rollouts, the other stage's decoder). Alone,
this script runs Stage 1 from a round folder and writes the policy, pi_ref, their optimizer state and
the rollouts into a new folder (the paper's Std. RL is `python ranke.py --mode=policy_only`):

    python train_policy.py --init_from=out/ranke/round_0003 --out_dir=out/stage1 [--policy_steps=N]
"""
import os
import sys
import time
from types import SimpleNamespace

import torch

import common
from checkpoint import atomic_save
from common import (all_gather, all_reduce_grads, autocast, caption_features, check_finite, grad_scaler,
                    load_optimizer, mean_stats, peak_memory_gb, read_prompts, reset_peak_memory, rng, save_model,
                    save_optimizer)
from losses import ema_update, group_advantages, grpo_loss, run_reward
from model_ar import generate, token_logprobs
from model_vq import load_decoder, load_vq

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and this project reconstructs. --
policy_steps = 3  # GRPO steps per round
policy_lr = 5e-5  # LlamaGen-XL: 1e-6 (r)
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
old_logprobs = "recompute"  # pi_old: 'recompute' (the training forward, no grad: the first ratio is exactly 1) |
#                             'sampler' (recorded while sampling: in bf16 up to 5% of tokens start outside the clip)
policy_grad_clip = 1.0
reward_decoder = "decoder"  # decodes rollouts for the reward: 'decoder' (Stage 2's latest) | 'ema' (its EMA: the release)
init_from = ""  # standalone: the round folder to start from
SWITCHES = {"logprob": ("sampler", "cond_only"), "old_logprobs": ("recompute", "sampler"),
            "kl_estimator": ("k3", "k2"), "reward_decoder": ("decoder", "ema")}


def init(c, d, reward, update=True):
    """Stage 1's state from round folder d: the policy, pi_ref and their AdamW state (when the stage
    updates the policy), and the frozen decoder that turns rollouts into images for the reward."""
    dev, s = c.device, SimpleNamespace(reward=reward, update=update)
    s.prompts = read_prompts(c.train_prompts)
    s.policy = common.load_policy(c, os.path.join(d, "policy.safetensors")).to(dev)
    decoder_file = "decoder.safetensors" if c.reward_decoder == "decoder" else "decoder_ema.safetensors"
    s.vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, decoder_file)).to(dev)
    s.vq.requires_grad_(False)
    if update:
        s.ref = common.load_policy(c, os.path.join(d, "policy_ref.safetensors")).to(dev)
        s.ref.requires_grad_(False)
        s.opt = torch.optim.AdamW(s.policy.parameters(), lr=c.policy_lr, betas=c.policy_betas,
                                  weight_decay=c.policy_weight_decay)
        load_optimizer(s.opt, os.path.join(d, "opt_policy.safetensors"))
        s.scaler = grad_scaler(c)
    else:
        s.policy.requires_grad_(False)
    return s


def set_decoder(s, path):
    """The hand-over from Stage 2: the decoder (or its EMA, as reward_decoder says) that decodes the next
    rollouts for the reward."""
    load_decoder(s.vq, path)


def run(s, c, rnd, rank=0, world=1):
    """`policy_steps` GRPO steps of round `rnd` (only draws and scores rollouts if not s.update).
    Returns the rollouts of every rank in chunk order (the same on any world size) and the metrics."""
    t0, dev = time.time(), c.device
    reset_peak_memory(dev)
    amp, G, C = autocast(c), c.group_size, s.policy.config.cls_token_num
    sampling = dict(cfg_scale=c.cfg_scale, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    cond_only = c.logprob == "cond_only"
    n_chunks = c.prompts_per_step // c.prompts_per_chunk
    n_tokens = c.prompts_per_step * G * c.block_size / world  # see grpo_loss: global tokens / world
    stats, saved = [], {"codes": [], "rewards": [], "prompt_ids": [], "logp_old": [], "chunk": []}
    bar = range(c.policy_steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 1 (GRPO)", leave=False)
    for step in bar:
        order = torch.randperm(len(s.prompts), generator=rng(c.seed, rnd, step))[:c.prompts_per_step]
        rollouts = []
        for k in range(rank, n_chunks, world):  # sample, decode, score
            ids = order.view(n_chunks, c.prompts_per_chunk)[k].repeat_interleave(G)
            texts = [s.prompts[i] for i in ids]
            cond, mask = (t.to(dev) for t in caption_features(texts, c, C))
            gen = torch.Generator(dev).manual_seed(rng(c.seed, rnd, step, k).initial_seed())
            with torch.no_grad(), amp:
                codes, logp_old = generate(s.policy, cond, mask, generator=gen, return_logprobs=True, **sampling)
                s.policy.free_cache()
                rewards = s.reward(s.vq.decode(codes), texts).float()
                if c.old_logprobs == "recompute":  # pi_old from exactly the forward the update will run
                    logp_old, _ = token_logprobs(s.policy, codes, cond, mask, **sampling, cond_only=cond_only)
                logp_ref = token_logprobs(s.ref, codes, cond, mask, **sampling, cond_only=cond_only)[0] \
                    if s.update else None
            advantages, flat = group_advantages(rewards, G)
            rollouts.append(SimpleNamespace(cond=cond, mask=mask, codes=codes, logp_old=logp_old.float(),
                                            logp_ref=logp_ref, advantages=advantages, rewards=rewards, flat=flat))
            for key, v in zip(saved, (codes, rewards, ids, logp_old, torch.full_like(ids, step * n_chunks + k))):
                saved[key].append(v.cpu())
        for epoch in range(1, c.ppo_epochs + 1 if s.update else 0):  # PPO: clipped updates on these rollouts
            for r in rollouts:
                with amp:
                    logp, entropy = token_logprobs(s.policy, r.codes, r.cond, r.mask, **sampling, cond_only=cond_only)
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
        stats.append({"reward": torch.cat([r.rewards for r in rollouts]).mean().item(),
                      "zero_adv_groups": sum(r.flat for r in rollouts) / len(rollouts)})
    metrics = mean_stats(stats, world, dev)
    out = {k: all_gather(torch.cat(v).to(dev), world).cpu() for k, v in saved.items()}
    order = out.pop("chunk").argsort(stable=True)
    metrics.update(policy_time_s=time.time() - t0, policy_peak_gb=peak_memory_gb(dev))
    return {k: v[order] for k, v in out.items()}, metrics


def save(s, d):
    """The stage's state into folder d (rank 0): the policy, pi_ref and their AdamW state."""
    save_model(s.policy, os.path.join(d, "policy.safetensors"))
    save_model(s.ref, os.path.join(d, "policy_ref.safetensors"))
    save_optimizer(s.opt, os.path.join(d, "opt_policy.safetensors"))


def save_rollouts(rollouts, c, rnd, path):
    """The hand-over to Stage 2, tagged with the run and the prompt file (rollouts name prompts by index)."""
    meta = {"run_id": c.run_id, "round": str(rnd), "prompts_sha1": c.prompts_sha1}
    atomic_save(rollouts, path, meta)


def write(s, rollouts, c, rnd, d):
    save(s, d)
    save_rollouts(rollouts, c, rnd, os.path.join(d, "rollouts.safetensors"))


if __name__ == "__main__":
    c = common.standalone_config(sys.modules[__name__])
    s = init(c, c.init_from, run_reward(c))
    rollouts, m = run(s, c, c.round)
    common.standalone_finish(c, m, lambda folder: write(s, rollouts, c, c.round, folder))
