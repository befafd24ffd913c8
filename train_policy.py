"""Stage 1 of RankE: GRPO on the policy with the decoder frozen (Eq. 3).

Per step: a batch of prompts, G rollouts each from the KV-cached CFG sampler (with their pi_old
log-probs), decoded by the round's frozen decoder, scored, ranked into group advantages; then
`ppo_epochs` clipped updates over those rollouts, each followed by the EMA update of pi_ref. The
rollouts are written for Stage 2.

Standalone this is the paper's policy-only baseline (Std. RL): rounds of Stage 1 with the decoder
frozen, i.e. `python ranke.py --mode=policy_only`:

    python train_policy.py [config file] [--key=value ...]
"""
import os
import time

import torch

from common import (all_gather, all_reduce_grads, caption_features, check_finite, load_optimizer,
                    mean_stats, peak_memory_gb, read_prompts, rng, save_model, save_optimizer)
from checkpoint import atomic_save
from losses import ema_update, group_advantages, grpo_loss, load_reward
from model_ar import generate, load_gpt, token_logprobs
from model_vq import load_decoder, load_vq

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and NOTES.md reconstructs. --
policy_lr = 5e-5  # LlamaGen-XL: 1e-6 (r)
policy_weight_decay = 0.01
policy_betas = (0.9, 0.999)
prompts_per_step = 8  # global batch of prompts per GRPO step, each with group_size rollouts
prompts_per_chunk = 4  # prompts per forward pass on a rank; fixes how the batch is split and seeded
ppo_epochs = 2  # clipped updates per rollout batch (with one, the ratio is always 1 and clip never acts)
clip_eps = 0.2
beta = 0.05  # KL coefficient
ref_decay = 0.99  # EMA decay of pi_ref per update (r); 1.0 = a frozen reference
cfg_scale = 4.0  # CFG during rollouts; LlamaGen-XL: 7.5 (r)
temperature = 1.0
top_k = 0
top_p = 0.9
logprob = "sampler"  # 'sampler': the distribution that drew the token | 'cond_only': published baselines
policy_grad_clip = 1.0


def policy_stage(c, prev, cur, rnd, steps, rank=0, world=1, update=True):
    """Run `steps` GRPO steps from round folder `prev`; write the policy, pi_ref, their optimizer
    state and the rollouts into `cur`. update=False only draws and scores rollouts (decoder-only)."""
    t0, dev = time.time(), c.device
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
    amp = torch.autocast(dev.split(":")[0], getattr(torch, c.dtype), enabled=dev.startswith("cuda"))
    prompts = read_prompts(c.train_prompts)
    policy = load_gpt(os.path.join(prev, "policy.safetensors"), c.gpt_model, block_size=c.block_size).to(dev)
    ref = load_gpt(os.path.join(prev, "policy_ref.safetensors"), c.gpt_model, block_size=c.block_size).to(dev)
    ref.requires_grad_(False)
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(prev, "decoder.safetensors")).to(dev)
    vq.requires_grad_(False)
    reward = load_reward(c.reward, dev, c.clip_model, c.clip_weights, c.clip_quick_gelu, c.hps_weights)
    opt = torch.optim.AdamW(policy.parameters(), lr=c.policy_lr, betas=c.policy_betas, weight_decay=c.policy_weight_decay)
    load_optimizer(opt, os.path.join(prev, "opt_policy.safetensors"))
    C, G = policy.config.cls_token_num, c.group_size
    sampling = dict(cfg_scale=c.cfg_scale, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
    n_chunks = c.prompts_per_step // c.prompts_per_chunk
    stats, saved = [], {"codes": [], "rewards": [], "prompt_ids": [], "logp_old": [], "chunk": []}
    bar = range(steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 1 (GRPO)", leave=False)
    for step in bar:
        order = torch.randperm(len(prompts), generator=rng(c.seed, rnd, step))[:c.prompts_per_step]
        chunks = order.view(n_chunks, c.prompts_per_chunk)
        rollouts = []
        for k in range(rank, n_chunks, world):  # sample, decode, score
            ids = chunks[k].repeat_interleave(G)
            cond, mask = (t.to(dev) for t in caption_features([prompts[i] for i in ids], c, C))
            gen = torch.Generator(dev).manual_seed(rng(c.seed, rnd, step, k).initial_seed())
            with torch.no_grad(), amp:
                codes, logp_old = generate(policy, cond, mask, generator=gen, return_logprobs=True, **sampling)
                policy.free_cache()
                r = reward(vq.decode(codes), [prompts[i] for i in ids]).float()
                logp_ref, _ = token_logprobs(ref, codes, cond, mask, **sampling, cond_only=c.logprob == "cond_only")
            adv, flat = group_advantages(r, G)
            rollouts.append((ids, cond, mask, codes, logp_old, logp_ref, adv, r, flat))
            for key, v in zip(saved, (codes, r, ids, logp_old, torch.full_like(ids, step * n_chunks + k))):
                saved[key].append(v.cpu())
        n_tokens = c.prompts_per_step * G * c.block_size / world  # see grpo_loss: global tokens / world
        for epoch in range(c.ppo_epochs if update else 0):  # PPO: clipped updates on these rollouts
            opt.zero_grad(set_to_none=True)
            for ids, cond, mask, codes, logp_old, logp_ref, adv, r, flat in rollouts:
                with amp:
                    logp, entropy = token_logprobs(policy, codes, cond, mask, **sampling, cond_only=c.logprob == "cond_only")
                    loss, st = grpo_loss(logp, logp_old, logp_ref, adv, c.clip_eps, c.beta, n_tokens, entropy)
                check_finite(loss, "GRPO loss", step)
                loss.backward()
                stats.append(st)
            all_reduce_grads(policy.parameters(), world)
            torch.nn.utils.clip_grad_norm_(policy.parameters(), c.policy_grad_clip)
            opt.step()
            ema_update(ref, policy, c.ref_decay)
        stats.append({"reward": torch.cat([x[7] for x in rollouts]).mean().item(),
                      "zero_adv_groups": sum(x[8] for x in rollouts) / len(rollouts)})
    metrics = mean_stats(stats, world, dev)
    # the rollouts of every rank, in chunk order (the same file on any world size)
    out = {k: all_gather(torch.cat(v).to(dev), world).cpu() for k, v in saved.items()}
    perm = out.pop("chunk").argsort(stable=True)
    if rank == 0:
        meta = {"run_id": c.run_id, "round": str(rnd), "prompts_sha1": c.prompts_sha1}
        atomic_save({k: v[perm] for k, v in out.items()}, os.path.join(cur, "rollouts.safetensors"), meta)
        if update:
            save_model(policy, os.path.join(cur, "policy.safetensors"))
            save_model(ref, os.path.join(cur, "policy_ref.safetensors"))
            save_optimizer(opt, os.path.join(cur, "opt_policy.safetensors"))
    metrics.update(policy_time_s=time.time() - t0, policy_peak_gb=peak_memory_gb(dev))
    return metrics


if __name__ == "__main__":
    import ranke
    ranke.main(mode="policy_only")
