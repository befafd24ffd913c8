"""The default run's training prompts: the 8 of the world's training prompts the shipped base draws worst.

Every 4th training prompt (183), 16 samples each as the rollouts sample (seed 123, CFG 1.5, top-p 0.9),
scored by the world's CLIP reward; the 8 with the lowest mean reward, lowest first, go to
data/shapes/prompts_hard.txt (~4 min on 2 cores). A run on a handful of prompts it draws badly is one whose
gain a person can see on a laptop (docs/shapes_world.md, "The default run").

    python data/shapes/hard_prompts.py
"""
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import ranke  # noqa: E402
from checkpoint import atomic_write  # noqa: E402
from common import caption_features, load_round, read_prompts  # noqa: E402
from losses import run_reward  # noqa: E402
from model_ar import generate  # noqa: E402


def prompt_rewards(c, d, prompts, n, seed=123):
    """R(x, c) of n samples per prompt from round folder d, drawn as the rollouts draw (fixed seed): len(prompts) x n."""
    policy, vq = load_round(c, d)
    reward = run_reward(c)
    texts = [p for p in prompts for _ in range(n)]
    cond, mask = caption_features(texts, c, policy.config.cls_token_num)
    gen, r = torch.Generator(c.device).manual_seed(seed), []
    with torch.no_grad():
        for i in range(0, len(texts), 256):
            codes = generate(policy, cond[i:i + 256], mask[i:i + 256], c.cfg_scale, c.temperature, c.top_k, c.top_p, generator=gen)
            r.append(reward(vq.decode(codes), texts[i:i + 256]))
    return torch.cat(r).view(len(prompts), n)


def hardest(n=8, every=4, samples=16):
    with tempfile.TemporaryDirectory() as tmp:  # round_0000 of a run of no rounds: the base, loaded as runs load it
        c = ranke.main([f"--out_dir={tmp}", "--train_prompts=out/shapes/prompts_train.txt", "--rounds=0",
                        "--eval_every=0", "--sample_every=0", "--device=cpu", "--dtype=float32"])  # as it was picked
        prompts = read_prompts(c.train_prompts)[::every]
        mean = prompt_rewards(c, os.path.join(tmp, "round_0000"), prompts, samples).mean(1)
    return [(prompts[i], mean[i].item()) for i in mean.argsort()[:n].tolist()]


if __name__ == "__main__":
    chosen = hardest()
    for p, r in chosen:
        print(f"{r:.4f}  {p}")
    atomic_write(os.path.join(HERE, "prompts_hard.txt"), "".join(p + "\n" for p, _ in chosen))
