"""RankE: post-train a discrete AR text-to-image model and its VQ decoder together, round after round.

  Stage 1 (train_policy.py): GRPO on the policy, the decoder frozen (Eq. 3).
  Stage 2 (train_decoder.py): the decoder adapts to Stage 1's fresh rollouts, the policy frozen (Eq. 4-8).

One process keeps each stage's models and optimizer states in memory from round to round; the stages
hand over plain safetensors files in out_dir/handover (Stage 1's rollouts, Stage 2's decoder), written
atomically. The full state is saved as out_dir/round_NNNN every `save_every` rounds and at the end;
a run resumes from its last saved round, exactly (every draw is seeded by seed, round, step, chunk).

    torchrun --nproc_per_node=8 ranke.py config/llamagen_xl_clip.py
    python ranke.py config/llamagen_xl_clip.py --mode=policy_only --out_dir=out/std_rl
"""
import hashlib
import json
import math
import os
import secrets
import shutil
import time

import torch
import torch.distributed as dist

import common
import eval as evaluation
import train_decoder
import train_policy
import train_sft
from common import (autocast, caption_features, check_dtype, commit_round, init_dist, read_meta, read_prompts,
                    round_dir, save_grid, save_model)
from configurator import defaults
from losses import reward_terms, run_reward
from model_ar import fill_t5_cache, generate
from model_janus import janus_config, prompt_ids
from model_vq import load_vq, save_decoder

# -- config: the loop's own keys. Each stage's keys stand at the top of train_policy.py,
#    train_decoder.py and common.py, and are set the same way (a config file, --key=value). --
mode = "ranke"  # 'ranke' | 'policy_only' (the paper's Std. RL) | 'decoder_only' | 'sft' (train_sft.py, decoder untouched)
init_policy = ""  # a round folder whose policy starts the run (e.g. an SFT run's last round); "" = gpt_ckpt
rounds = 10
save_every = 1  # rounds between saves of the full state (models, optimizers, EMA, pi_ref); the last round,
#                 and every round that is sampled or evaluated, are saved too. A run resumes from the last save.
sample_every = 5  # rounds between sample grids (round 0 too); 0 = never
sample_prompts = 8  # the first N training prompts, fixed seed
resume = True  # continue from the last saved round in out_dir
keep_last = 2  # saved rounds kept on disk (a GPT-XL round with optimizer states is ~13 GB) ...
keep_every = 10  # ... besides round 0 and every keep_every-th, for evaluation
eval_every = 5  # eval.py's metrics on round 0, every eval_every rounds and the last; 0 = off
LOOP_KEYS = ("mode", "init_policy", "rounds", "save_every", "sample_every", "sample_prompts", "resume", "keep_last", "keep_every",
             "eval_every")

ROUND_FILES = ["policy.safetensors", "policy_ref.safetensors", "opt_policy.safetensors", "decoder.safetensors",
               "decoder_ema.safetensors", "disc.safetensors", "opt_decoder.safetensors", "opt_disc.safetensors"]
# what a resumed run must share with the run in out_dir (the world size is free: it changes no result)
COMPATIBLE = ("backbone", "init_policy", "gpt_model", "gpt_layers", "vq_model", "image_size", "group_size", "seed", "mode", "policy_steps", "decoder_steps",
              "prompts_per_step", "prompts_per_chunk", "decoder_chunks", "decoder_batch", "real_batch")


# ---------------------------------------------------------------- the round folders of a run


def last_round(out_dir):
    """The number of the last complete round, -1 if none."""
    done = [int(d[6:]) for d in os.listdir(out_dir) if d.startswith("round_") and d[6:].isdigit()] \
        if os.path.isdir(out_dir) else []
    return max(done, default=-1)


def begin_round(out_dir, k):
    tmp = round_dir(out_dir, k) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a crashed attempt left
    os.makedirs(tmp)
    return tmp


def log_metrics(out_dir, record):
    """One line of the run's metrics.jsonl (a round's training metrics, or an evaluation)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def carry_over(src_dir, dst_dir, names):
    """Files a stage did not change this round: hard links to the previous round's (copies where
    links are not possible), so every round folder is complete on its own."""
    for n in names:
        src, dst = os.path.join(src_dir, n), os.path.join(dst_dir, n)
        if os.path.exists(src) and not os.path.exists(dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


# ---------------------------------------------------------------- the loop


def config(argv=None, **forced):
    eval_keys = {k: v for k, v in defaults(evaluation).items()
                 if k.startswith(("eval_", "geneval_")) or k in ("feature_net", "feature_size", "fid_crop", "kl_smoothing",
                                                               "grid_prompts", "figure_prompts")}
    return common.make_config({**defaults(common), **defaults(train_policy), **defaults(train_decoder),
                               **defaults(train_sft), **eval_keys,
                               **{k: globals()[k] for k in LOOP_KEYS}}, argv, **forced)


def split_hint(n, world, step=1):
    """The smallest multiple of `world` that is >= n and a multiple of `step`."""
    m = world * math.ceil(n / world)
    while m % step:
        m += world
    return m


def validate(c, rank, world):
    """Every bad input gets its message here, once (rank 0), before anything is written to out_dir."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(msg if rank == 0 else 1)
    for switches in ({"mode": ("ranke", "policy_only", "decoder_only", "sft")}, common.SWITCHES, train_policy.SWITCHES,
                     train_decoder.SWITCHES):
        msg = common.bad_switch(c, switches)
        need(not msg, msg)
    need(not (c.logprob == "cond_only" and c.old_logprobs == "sampler"),
         "logprob=cond_only needs old_logprobs=recompute: the sampler's log-probs are of the guided distribution, "
         "so the PPO ratio would compare two different distributions")
    try:
        check_dtype(c.device, c.dtype)
    except SystemExit as e:
        need(False, str(e))
    need(c.save_every >= 1, f"save_every must be >= 1 (rounds between full saves), not {c.save_every}")
    need(c.prompts_per_step % c.prompts_per_chunk == 0,
         f"prompts_per_step ({c.prompts_per_step}) must be a multiple of prompts_per_chunk ({c.prompts_per_chunk})")
    need(c.sample_batch >= 0 and c.sample_batch % c.prompts_per_chunk == 0,
         f"sample_batch ({c.sample_batch}) must be 0 (all of a rank's prompts in one sampler call) or a multiple "
         f"of prompts_per_chunk ({c.prompts_per_chunk})")
    n = c.prompts_per_step // c.prompts_per_chunk
    if n % world:
        fits = [k for k in range(c.prompts_per_chunk, 0, -1)
                if c.prompts_per_step % k == 0 and (c.prompts_per_step // k) % world == 0]
        need(False, f"a GRPO step's {n} prompt chunks (prompts_per_step {c.prompts_per_step} / prompts_per_chunk "
                    f"{c.prompts_per_chunk}) cannot be dealt evenly to {world} ranks: set "
                    + (f"prompts_per_chunk={fits[0]} or " if fits else "")
                    + f"prompts_per_step={split_hint(n, world) * c.prompts_per_chunk}")
    need(c.selection == "top_k" or c.decoder_chunks * c.decoder_batch % c.group_size == 0,
         f"a decoder step takes whole prompt groups: decoder_chunks x decoder_batch ({c.decoder_chunks} x "
         f"{c.decoder_batch}) must be a multiple of group_size ({c.group_size})")
    if c.decoder_chunks % world:
        step = c.group_size // math.gcd(c.group_size, c.decoder_batch)
        need(False, f"a decoder step's {c.decoder_chunks} chunks (decoder_chunks) cannot be dealt evenly to {world} "
                    f"ranks: set decoder_chunks={split_hint(c.decoder_chunks, world, step)}")
    need(c.sft_chunks % world == 0 or c.mode != "sft",
         f"an SFT step's {c.sft_chunks} chunks (sft_chunks) cannot be dealt evenly to {world} ranks: "
         f"set sft_chunks={split_hint(c.sft_chunks, world)}")
    need(not c.init_policy or os.path.isfile(os.path.join(c.init_policy, "policy.safetensors")),
         f"init_policy must be a round folder holding policy.safetensors (an SFT run's round_NNNN), not {c.init_policy!r}")
    for key in ("gpt_ckpt", "vq_ckpt", "train_prompts", "train_pairs"):  # a Janus checkpoint is a folder
        path = getattr(c, key)
        need(os.path.isfile(path) or (c.backbone == "janus" and key.endswith("ckpt") and os.path.isdir(path)),
             f"{key} not found: {path}")
    if c.backbone == "janus":
        need(c.caption_padding == "left", "Janus prompts are left-padded, as its processor pads them: set caption_padding=left")
        try:  # the image grid the checkpoint generates, and every training prompt within janus_prompt_len
            common.check_janus_image(c, janus_config(c.gpt_ckpt))
            prompt_ids(read_prompts(c.train_prompts), c.gpt_ckpt, c.cls_token_num, c.janus_template)
        except (FileNotFoundError, ValueError) as e:
            need(False, str(e))
    try:
        terms = reward_terms(c)
    except ValueError as e:
        need(False, str(e))
    files = {"clip": c.clip_weights, "hpsv2": c.hps_weights, "aesthetic": c.aesthetic_weights}
    for t in terms + (["clip"] if "aesthetic" in terms else []):
        need(os.path.isfile(files[t]), f"{t} reward weights not found: {files[t]!r}")
    need(not ("hpsv2" in terms and c.lambda_bp > 0 and c.mode != "policy_only"),
         "HPSv2 is a black-box reward: set lambda_bp=0 (Rank-GAN carries its signal to the decoder)")
    need(c.tau > 0, f"tau must be > 0 (inf = uniform weights; small = nearly best-of-N), not {c.tau}")
    need(1 <= c.select_k <= c.group_size and c.decoder_chunks * c.decoder_batch % c.select_k == 0,
         f"select_k ({c.select_k}) must be within 1..group_size and divide decoder_chunks x decoder_batch")
    need(min(c.select_temp_start, c.select_temp_end) > 0, "select_temp_start and select_temp_end must be > 0")
    need(c.ref_update_every >= 1, f"ref_update_every must be >= 1, not {c.ref_update_every}")
    need(c.cons_kind == "mse" or (c.lpips_vgg and c.lpips_lin),
         "cons_kind=lpips needs LPIPS weights: set lpips_vgg and lpips_lin (or cons_kind=mse)")
    prompts = read_prompts(c.train_prompts)
    common.read_pairs(c.train_pairs, check_images=True)
    need(len(prompts) >= c.prompts_per_step, f"{c.train_prompts} has {len(prompts)} prompts, fewer than prompts_per_step ({c.prompts_per_step})")
    with open(c.train_prompts, "rb") as f:
        c.prompts_sha1 = hashlib.sha1(f.read()).hexdigest()  # rollouts name their prompts by index


def base_round(c):
    """round_0000: the base policy (also the first pi_ref) and decoder (also the first EMA decoder)."""
    tmp = begin_round(c.out_dir, 0)
    policy = common.load_policy(c, os.path.join(c.init_policy, "policy.safetensors") if c.init_policy else c.gpt_ckpt)
    save_model(policy, os.path.join(tmp, "policy.safetensors"))
    os.link(os.path.join(tmp, "policy.safetensors"), os.path.join(tmp, "policy_ref.safetensors"))
    vq = load_vq(c.vq_ckpt, c.vq_model)
    save_decoder(vq, os.path.join(tmp, "decoder.safetensors"))
    os.link(os.path.join(tmp, "decoder.safetensors"), os.path.join(tmp, "decoder_ema.safetensors"))
    commit_round(tmp, {"round": 0, "run_id": c.run_id, "config": vars(c), "metrics": {}})


@torch.no_grad()
def sample_grid(c, policy, vq, path):
    """The first `sample_prompts` training prompts, seed `seed`, with the given policy and decoder."""
    prompts = read_prompts(c.train_prompts)[:c.sample_prompts]
    cond, mask = (t.to(c.device) for t in caption_features(prompts, c, policy.config.cls_token_num))
    gen = torch.Generator(c.device).manual_seed(c.seed)
    with autocast(c):
        codes = generate(policy, cond, mask, c.cfg_scale, c.temperature, c.top_k, c.top_p, generator=gen)
        policy.free_cache()
        save_grid(vq.decode(codes).clamp(-1, 1), path, nrow=min(8, len(prompts)))


def log_line(rnd, m):
    keys = ["L_sft", "reward", "kl", *sorted(k for k in m if k.startswith("clip_frac_epoch")), "ratio_dev_epoch1", "entropy",
            "zero_adv_groups", "L_rec", "L_cons", "L_BP", "L_RankGAN", "L_GAN_rec", "L_disc", "disc_acc"]
    parts = [f"{k} {m[k]:.4g}" for k in keys if k in m]
    times = [f"{s} {m[s + '_time_s']:.1f}s {m[s + '_peak_gb']:.2f}GB" for s in ("policy", "decoder") if s + "_time_s" in m]
    return f"round {rnd} | " + " | ".join(parts + times)


def eta(elapsed, done, left):
    """The run's time left, from the mean time of the rounds done so far (their evaluations included)."""
    sec = round(elapsed / done * left)
    return f"{sec // 3600}h{sec // 60 % 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


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
        log_metrics(c.out_dir, {"round": rnd, "eval": m})
    return m


def save_round(c, rnd, policy, decoder, rollouts_file, metrics):
    """The full state after round rnd as a round folder (rank 0), written as .tmp and renamed; files
    this mode does not change are hard links to the last saved round's. Then retention."""
    last = round_dir(c.out_dir, last_round(c.out_dir))
    tmp = begin_round(c.out_dir, rnd)
    if policy.update:
        (train_sft if c.mode == "sft" else train_policy).save(policy, tmp)
    if decoder is not None:
        train_decoder.save(decoder, tmp)
    carry_over(os.path.dirname(rollouts_file), tmp, ["rollouts.safetensors"])  # replaced, never rewritten: a link is safe
    carry_over(last, tmp, ROUND_FILES)
    if c.sample_every and rnd % c.sample_every == 0:
        sample_grid(c, policy.policy, policy.vq, os.path.join(tmp, "samples.png"))
    commit_round(tmp, {"round": rnd, "run_id": c.run_id, "config": vars(c), "metrics": metrics})
    saved = sorted(int(x[6:]) for x in os.listdir(c.out_dir) if x.startswith("round_") and x[6:].isdigit())
    for old in saved[:-c.keep_last]:
        if old and old % c.keep_every:
            shutil.rmtree(round_dir(c.out_dir, old), ignore_errors=True)


def main(argv=None, **forced):
    c = config(argv, **forced)
    rank, world, c.device = init_dist(c.device)
    prepare_world(c, rank, world)
    validate(c, rank, world)
    start = last_round(c.out_dir)
    if start >= 0:
        old = read_meta(round_dir(c.out_dir, start))["config"]
        changed = [k for k in COMPATIBLE if old.get(k) != getattr(c, k)]
        if not c.resume or changed or old.get("prompts_sha1") != c.prompts_sha1:
            raise SystemExit(f"{c.out_dir} already holds a run up to round {start}"
                             + (f" with other {', '.join(changed)}" if changed else "")
                             + ": choose another out_dir (nothing was overwritten)")
        if rank == 0:
            print(f"resuming from {round_dir(c.out_dir, start)} (last saved round)")
    elif rank == 0:
        c.run_id = secrets.token_hex(8)
        os.makedirs(c.out_dir, exist_ok=True)
        base_round(c)
    barrier(world)
    start = max(start, 0)
    c.run_id = read_meta(round_dir(c.out_dir, start))["run_id"]
    if rank == 0 and c.backbone == "llamagen":  # T5 runs once for every prompt of the run; the stages read the cache
        texts = read_prompts(c.train_prompts) + ([t for _, t in common.read_pairs(c.train_pairs)] if c.mode == "sft" else [])
        fill_t5_cache(texts, c.t5_cache, c.t5_path, c.device, max_length=c.cls_token_num)
    barrier(world)
    # each stage's models and optimizer states stay in memory from here to the end; the reward is shared
    d = round_dir(c.out_dir, start)
    if c.mode == "sft":
        policy, decoder = train_sft.init(c, d), None
    else:
        reward = run_reward(c)
        policy = train_policy.init(c, d, reward, update=c.mode != "decoder_only")
        decoder = train_decoder.init(c, d, reward, rank) if c.mode != "policy_only" else None
    if rank == 0 and c.sample_every and start == 0 and not os.path.exists(os.path.join(d, "samples.png")):
        sample_grid(c, policy.policy, policy.vq, os.path.join(d, "samples.png"))
    evals, rewards = {}, {}
    if c.eval_every and start == 0:
        evals[0] = evaluate(c, 0, rank, world)
    handover = os.path.join(c.out_dir, "handover")  # this round's rollouts and decoder, for the other stage
    rollouts_file, decoder_file = os.path.join(handover, "rollouts.safetensors"), os.path.join(handover, "decoder.safetensors")
    os.makedirs(handover, exist_ok=True)
    run_t0 = time.time()
    for rnd in range(start + 1, c.rounds + 1):
        t0 = time.time()
        if c.mode == "sft":
            m = train_sft.run(policy, c, rnd, rank, world)
        else:
            rollouts, m = train_policy.run(policy, c, rnd, rank, world)
            if rank == 0:
                train_policy.save_rollouts(rollouts, c, rnd, rollouts_file)
            barrier(world)
        if decoder is not None:
            m.update(train_decoder.run(decoder, c, rnd, rollouts_file, rank, world))
            if rank == 0:
                save_decoder(decoder.vq if c.reward_decoder == "decoder" else decoder.ema, decoder_file)
            barrier(world)
            train_policy.set_decoder(policy, decoder_file)  # the next round's rewards see this decoder
        evaluated = c.eval_every and (rnd % c.eval_every == 0 or rnd == c.rounds)
        if rank == 0:
            if rnd % c.save_every == 0 or rnd == c.rounds or evaluated or (c.sample_every and rnd % c.sample_every == 0):
                save_round(c, rnd, policy, decoder, rollouts_file, m)
            m["round_time_s"] = time.time() - t0
            rewards[rnd] = m.get("reward")
            log_metrics(c.out_dir, {"round": rnd, "time": time.time(), **m})
            print(log_line(rnd, m) + f" | eta {eta(time.time() - run_t0, rnd - start, c.rounds - rnd)}", flush=True)
        barrier(world)
        if evaluated:
            evals[rnd] = evaluate(c, rnd, rank, world)
    if rank == 0 and len(evals) > 1:  # eval_table.md, eval_curves.png and eval_before_after.png in out_dir
        first, last = min(evals), max(evals)
        evaluation.report(c, {c.out_dir: c}, {c.out_dir: evals}, {c.out_dir: rewards}, c.out_dir)
        print(f"\nbefore (round {first}) and after (round {last}) on the evaluation prompts "
              f"({os.path.join(c.out_dir, 'eval_before_after.png')}):")
        print(evaluation.table({c.out_dir: {first: evals[first], last: evals[last]}}))
    if world > 1:
        dist.destroy_process_group()
    return c


if __name__ == "__main__":
    main()
