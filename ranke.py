"""RankE: post-train a discrete AR text-to-image model and its VQ decoder together, round after round.

  Stage 1 (train_policy.py): GRPO on the policy, the decoder frozen (Eq. 3).
  Stage 2 (train_decoder.py): the decoder adapts to Stage 1's fresh rollouts, the policy frozen (Eq. 4-8).

The stages hand over plain safetensors files in out_dir/round_NNNN (see common.py); a run resumes
from its last complete round.

    torchrun --nproc_per_node=8 ranke.py config/llamagen_xl_clip.py
    python ranke.py config/llamagen_xl_clip.py --mode=policy_only --out_dir=out/std_rl
"""
import hashlib
import os
import secrets
import shutil
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

import common
import eval as evaluation
import train_decoder
import train_policy
from common import (caption_features, carry_over, commit_round, init_dist, last_round, load_round, read_meta,
                    read_prompts, round_dir, save_grid, save_model)
from configurator import configure, defaults
from model_ar import fill_t5_cache, generate, gpt_config, load_gpt
from model_vq import VQ_CONFIGS, load_vq, save_decoder

# -- config: the loop's own keys. Each stage's keys stand at the top of train_policy.py,
#    train_decoder.py and common.py, and are set the same way (a config file, --key=value). --
mode = "ranke"  # 'ranke' | 'policy_only' (the paper's Std. RL) | 'decoder_only'
rounds = 10
policy_steps = 3  # GRPO steps per round
decoder_steps = 3  # decoder steps per round
sample_every = 5  # rounds between sample grids (round 0 too); 0 = never
sample_prompts = 8  # the first N training prompts, fixed seed
resume = True  # continue from the last complete round in out_dir
keep_last = 2  # complete rounds kept on disk (a GPT-XL round with optimizer states is ~13 GB) ...
keep_every = 10  # ... besides round 0 and every keep_every-th, for evaluation
eval_every = 5  # eval.py's metrics on round 0, every eval_every rounds and the last; 0 = off
LOOP_KEYS = ("mode", "rounds", "policy_steps", "decoder_steps", "sample_every", "sample_prompts", "resume",
             "keep_last", "keep_every", "eval_every")

ROUND_FILES = ["policy.safetensors", "policy_ref.safetensors", "opt_policy.safetensors", "decoder.safetensors",
               "decoder_ema.safetensors", "disc.safetensors", "opt_decoder.safetensors", "opt_disc.safetensors"]
COMPATIBLE = ("gpt_model", "vq_model", "image_size", "group_size", "seed", "mode", "policy_steps", "decoder_steps")


def config(argv=None, **forced):
    cfg = {**defaults(common), **defaults(train_policy), **defaults(train_decoder),
           **{k: v for k, v in defaults(evaluation).items() if k.startswith("eval_") or k in ("feature_net", "feature_size", "kl_smoothing", "grid_prompts")},
           **{k: globals()[k] for k in LOOP_KEYS}}
    configure(cfg, argv)
    cfg.update(forced)
    c = SimpleNamespace(**cfg)
    vq_cfg = VQ_CONFIGS[c.vq_model]
    c.block_size = (c.image_size // 2 ** (len(vq_cfg.ch_mult) - 1)) ** 2
    c.codebook_size = vq_cfg.codebook_size
    c.cls_token_num = gpt_config(c.gpt_model).cls_token_num
    return c


def validate(c, world):
    """Every bad input gets its message here, before anything is written to out_dir."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(msg)
    need(c.mode in ("ranke", "policy_only", "decoder_only"), f"mode must be 'ranke', 'policy_only' or 'decoder_only', not {c.mode!r}")
    need(c.vq_model in VQ_CONFIGS, f"unknown vq_model {c.vq_model!r}: one of {sorted(VQ_CONFIGS)}")
    need(c.prompts_per_step % c.prompts_per_chunk == 0,
         f"prompts_per_step ({c.prompts_per_step}) must be a multiple of prompts_per_chunk ({c.prompts_per_chunk})")
    need((c.prompts_per_step // c.prompts_per_chunk) % world == 0,
         f"the {c.prompts_per_step // c.prompts_per_chunk} prompt chunks of a step must divide among {world} ranks")
    need(c.decoder_chunks % world == 0, f"decoder_chunks ({c.decoder_chunks}) must divide among {world} ranks")
    need(c.decoder_batch % c.group_size == 0,
         f"group_size ({c.group_size}) must divide decoder_batch ({c.decoder_batch}): Stage 2 takes whole prompt groups")
    for key in ("gpt_ckpt", "vq_ckpt", "train_prompts", "train_pairs"):
        need(os.path.isfile(getattr(c, key)), f"{key} not found: {getattr(c, key)}")
    weights = c.clip_weights if c.reward == "clip" else c.hps_weights
    need(c.reward in ("clip", "hpsv2"), f"reward must be 'clip' or 'hpsv2', not {c.reward!r}")
    need(os.path.isfile(weights), f"{c.reward} reward weights not found: {weights}")
    need(not (c.reward == "hpsv2" and c.lambda_bp > 0 and c.mode != "policy_only"),
         "HPSv2 is a black-box reward: set lambda_bp=0 (Rank-GAN carries its signal to the decoder)")
    prompts = read_prompts(c.train_prompts)
    common.read_pairs(c.train_pairs, check_images=True)
    need(len(prompts) >= c.prompts_per_step, f"{c.train_prompts} has {len(prompts)} prompts, fewer than prompts_per_step ({c.prompts_per_step})")
    with open(c.train_prompts, "rb") as f:
        c.prompts_sha1 = hashlib.sha1(f.read()).hexdigest()  # rollouts name their prompts by index


def base_round(c):
    """round_0000: the base policy (also the first pi_ref) and decoder (also the first EMA decoder)."""
    tmp = common.begin_round(c.out_dir, 0)
    policy = load_gpt(c.gpt_ckpt, c.gpt_model, block_size=c.block_size)
    save_model(policy, os.path.join(tmp, "policy.safetensors"))
    os.link(os.path.join(tmp, "policy.safetensors"), os.path.join(tmp, "policy_ref.safetensors"))
    vq = load_vq(c.vq_ckpt, c.vq_model)
    save_decoder(vq, os.path.join(tmp, "decoder.safetensors"))
    os.link(os.path.join(tmp, "decoder.safetensors"), os.path.join(tmp, "decoder_ema.safetensors"))
    commit_round(tmp, {"round": 0, "run_id": c.run_id, "config": vars(c), "metrics": {}})


@torch.no_grad()
def sample_grid(c, d, path):
    """The first `sample_prompts` training prompts, seed `seed`, with the round's policy and decoder."""
    prompts = read_prompts(c.train_prompts)[:c.sample_prompts]
    policy, vq = load_round(c, d)
    cond, mask = (t.to(c.device) for t in caption_features(prompts, c, policy.config.cls_token_num))
    gen = torch.Generator(c.device).manual_seed(c.seed)
    codes = generate(policy, cond, mask, c.cfg_scale, c.temperature, c.top_k, c.top_p, generator=gen)
    save_grid(vq.decode(codes).clamp(-1, 1), path, nrow=min(8, len(prompts)))


def log_line(rnd, m):
    keys = ["reward", "kl", "clip_frac", "entropy", "zero_adv_groups", "L_rec", "L_cons", "L_BP", "L_RankGAN",
            "L_disc", "disc_acc"]
    parts = [f"{k} {m[k]:.4g}" for k in keys if k in m]
    times = [f"{s} {m[s + '_time_s']:.1f}s {m[s + '_peak_gb']:.2f}GB" for s in ("policy", "decoder") if s + "_time_s" in m]
    return f"round {rnd} | " + " | ".join(parts + times)


def barrier(world):
    if world > 1:
        dist.barrier()


def prepare_world(c, rank, world):
    """Run the `prepare` command (rank 0) that builds a world's base models and data when missing."""
    if c.prepare and rank == 0:
        import shlex
        import subprocess
        import sys
        here = os.path.dirname(os.path.abspath(__file__))
        script, *args = shlex.split(c.prepare)
        if subprocess.run([sys.executable, os.path.join(here, script), *args]).returncode:
            raise SystemExit(f"prepare failed: {c.prepare}")
    barrier(world)


def evaluate(c, rnd, rank, world):
    m = evaluation.evaluate_round(c, c, round_dir(c.out_dir, rnd), rank, world)
    if rank == 0:
        print(f"eval round {rnd} | " + " | ".join(f"{k} {v:.4g}" for k, v in m.items()), flush=True)
        common.log_metrics(c.out_dir, {"round": rnd, "eval": m})
    return m


def main(argv=None, **forced):
    c = config(argv, **forced)
    rank, world, c.device = init_dist(c.device)
    prepare_world(c, rank, world)
    validate(c, world)
    start = last_round(c.out_dir)
    if start >= 0:
        old = read_meta(round_dir(c.out_dir, start))["config"]
        changed = [k for k in COMPATIBLE if old.get(k) != getattr(c, k)]
        if not c.resume or changed or old.get("prompts_sha1") != c.prompts_sha1:
            raise SystemExit(f"{c.out_dir} already holds a run up to round {start}"
                             + (f" with other {', '.join(changed)}" if changed else "")
                             + ": choose another out_dir (nothing was overwritten)")
        if rank == 0:
            print(f"resuming from {round_dir(c.out_dir, start)} (last complete round)")
    elif rank == 0:
        c.run_id = secrets.token_hex(8)
        os.makedirs(c.out_dir, exist_ok=True)
        base_round(c)
    barrier(world)
    start = max(start, 0)
    c.run_id = read_meta(round_dir(c.out_dir, start))["run_id"]
    if rank == 0:  # T5 runs once for every prompt of the run; the stages read the cache
        fill_t5_cache(read_prompts(c.train_prompts), os.path.join(c.out_dir, "t5_cache.safetensors"), c.t5_path,
                      c.device, max_length=c.cls_token_num)
        if c.sample_every and start == 0 and not os.path.exists(os.path.join(round_dir(c.out_dir, 0), "samples.png")):
            sample_grid(c, round_dir(c.out_dir, 0), os.path.join(round_dir(c.out_dir, 0), "samples.png"))
    barrier(world)
    evals = {}
    if c.eval_every and start == 0:
        evals[0] = evaluate(c, 0, rank, world)
    for rnd in range(start + 1, c.rounds + 1):
        prev = round_dir(c.out_dir, rnd - 1)
        cur = round_dir(c.out_dir, rnd) + ".tmp"
        if rank == 0:
            common.begin_round(c.out_dir, rnd)
        barrier(world)
        try:
            m = train_policy.policy_stage(c, prev, cur, rnd, c.policy_steps, rank, world, update=c.mode != "decoder_only")
            if c.mode != "policy_only":
                m.update(train_decoder.decoder_stage(c, prev, cur, rnd, c.decoder_steps,
                                                     os.path.join(cur, "rollouts.safetensors"), rank, world))
        except Exception:
            if rank == 0:  # a failed round leaves nothing behind; the last complete round stands
                shutil.rmtree(cur, ignore_errors=True)
            raise
        if rank == 0:
            carry_over(prev, cur, ROUND_FILES)
            if c.sample_every and rnd % c.sample_every == 0:
                sample_grid(c, cur, os.path.join(cur, "samples.png"))
            commit_round(cur, {"round": rnd, "run_id": c.run_id, "config": vars(c), "metrics": m})
            common.log_metrics(c.out_dir, {"round": rnd, "time": time.time(), **m})
            print(log_line(rnd, m), flush=True)
            old = rnd - c.keep_last
            if old > 0 and old % c.keep_every:
                shutil.rmtree(round_dir(c.out_dir, old), ignore_errors=True)
        barrier(world)
        if c.eval_every and (rnd % c.eval_every == 0 or rnd == c.rounds):
            evals[rnd] = evaluate(c, rnd, rank, world)
    if rank == 0 and len(evals) > 1:
        first, last = min(evals), max(evals)
        print(f"\nbefore (round {first}) and after (round {last}) on the evaluation prompts:")
        print(evaluation.table({c.out_dir: {first: evals[first], last: evals[last]}}))
    if world > 1:
        dist.destroy_process_group()
    return c


def decoder_only_on_file():
    """train_decoder.py standalone: Stage 2 on one rollouts file, from a round folder's decoder."""
    c = config()
    if not (c.rollouts and c.init_from):
        raise SystemExit("train_decoder.py needs --rollouts=FILE and --init_from=ROUND_FOLDER")
    for p in (c.rollouts, os.path.join(c.init_from, "meta.json")):
        if not os.path.isfile(p):
            raise SystemExit(f"not found: {p}")
    c.prompts_sha1 = read_meta(c.init_from)["config"]["prompts_sha1"]
    c.run_id = read_meta(c.init_from)["run_id"]
    if os.path.exists(c.out_dir) and os.listdir(c.out_dir):
        raise SystemExit(f"{c.out_dir} is not empty: choose another out_dir (nothing was overwritten)")
    tmp = c.out_dir.rstrip("/") + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    try:
        m = train_decoder.decoder_stage(c, c.init_from, tmp, 1, c.decoder_steps, c.rollouts)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(c.out_dir):
        os.rmdir(c.out_dir)
    commit_round(tmp, {"round": 1, "run_id": c.run_id, "config": vars(c), "metrics": m})
    print(log_line(1, m))


if __name__ == "__main__":
    main()
