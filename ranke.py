"""RankE: post-train a discrete AR text-to-image model and its VQ decoder together, round after round.

  Stage 1 (train_policy.py): GRPO on the policy, the decoder frozen (Eq. 3).
  Stage 2 (train_decoder.py): the decoder adapts to Stage 1's fresh rollouts, the policy frozen (Eq. 4-8).

One process keeps each stage's models and optimizer states in memory from round to round; the stages
hand over plain safetensors files in out_dir/handover (Stage 1's rollouts, Stage 2's decoder), written
atomically. The full state is saved as out_dir/round_NNNN every `save_every` rounds and at the end;
a run resumes from its last saved round, exactly (every draw is seeded by seed, round, step, chunk;
with decoder_sync = 'per_rank' every rank restarts from rank 0's decoder).
The run's folder (round files, resume, retention, its log) is run_folder.py's.

    torchrun --nproc_per_node=8 ranke.py config/llamagen_xl_clip.py
    python ranke.py config/llamagen_xl_clip.py --mode=policy_only --out_dir=out/std_rl
"""
import os
import sys
import time

import torch.distributed as dist

import common
import eval as evaluation
import run_folder
import train_decoder
import train_policy
import train_sft
from common import barrier, init_dist, read_prompts, round_dir
from configurator import defaults
from losses import run_reward
from model_vq import save_decoder

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
resume_from = -1  # ... or from this saved round (-1: the last); the rounds after it are set aside, not deleted
keep_last = 2  # saved rounds kept on disk (a GPT-XL round with optimizer states is ~13 GB) ...
keep_every = 10  # ... besides round 0 and every keep_every-th (an evaluation's figures stay in metrics.jsonl)
eval_every = 5  # eval.py's metrics on round 0, every eval_every rounds and the last; 0 = off
wandb_log = False  # every round's metrics and pictures to Weights & Biases too (pip install wandb; WANDB_MODE=offline)
wandb_project = "ranke"
wandb_run_name = ""  # "" = out_dir's name
RANGES = {"rounds": common.NON_NEGATIVE, "resume_from": (lambda v: v >= -1, ">= -1 (-1: the last saved round)"),
          "save_every": (lambda v: v >= 1, ">= 1 (rounds between full saves)"),
          "sample_every": common.NON_NEGATIVE, "sample_prompts": common.AT_LEAST_1, "keep_last": common.AT_LEAST_1,
          "keep_every": common.AT_LEAST_1, "eval_every": common.NON_NEGATIVE}

# ---------------------------------------------------------------- the loop


def settings():
    """Every setting of a run and its default: the shared ones, each stage's, the evaluation's, the loop's."""
    eval_keys = {k: v for k, v in defaults(evaluation).items() if k not in evaluation.TARGET}
    return {**defaults(common), **defaults(train_policy), **defaults(train_decoder), **defaults(train_sft), **eval_keys,
            **defaults(sys.modules[__name__])}


def config(argv=None, **forced):
    return common.make_config(settings(), argv, **forced)


def validate(c, rank, world):
    """Every bad input gets its message here, once (rank 0), before anything is written to out_dir: the
    loop's own settings, then the checks of the stages this mode runs (the same they run alone)."""
    stages = [common] + ([train_sft] if c.mode == "sft" else [train_policy]) + \
        ([train_decoder] if c.mode in ("ranke", "decoder_only") else []) + ([evaluation] if c.eval_every else [])
    msg = common.bad_switch(c, {"mode": ("ranke", "policy_only", "decoder_only", "sft")}) or common.out_of_range(c, RANGES)
    if not msg and c.init_policy and not os.path.isfile(os.path.join(c.init_policy, "policy.safetensors")):
        msg = f"init_policy must be a round folder holding policy.safetensors (an SFT run's round_NNNN), not {c.init_policy!r}"
    msg = msg or next((m for m in (stage.check(c, world) for stage in stages) if m), "")
    if not msg and c.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            msg = "wandb_log=True needs the wandb package: pip install wandb (or set wandb_log=False)"
    if msg:
        raise SystemExit(msg if rank == 0 else 1)
    c.prompts_sha1 = common.file_digest(c.train_prompts, "sha1")  # rollouts name their prompts by index


def prepare_world(c, rank, world):
    """Run the `prepare` command (rank 0) that builds a world's base models and data when missing."""
    if c.prepare and rank == 0:
        import shlex
        import subprocess
        here = os.path.dirname(os.path.abspath(__file__))
        script, *args = shlex.split(c.prepare)
        if subprocess.run([sys.executable, os.path.join(here, script), *args]).returncode:
            raise SystemExit(f"prepare failed: {c.prepare}")
    barrier(world)


def evaluate(c, rnd, rank, world, tracker):
    m = evaluation.evaluate_round(c, c, round_dir(c.out_dir, rnd), rank, world)
    if rank == 0:
        print(f"eval round {rnd} | " + " | ".join(f"{k} {v:.4g}" for k, v in m.items()), flush=True)
        run_folder.log_metrics(c.out_dir, {"round": rnd, "eval": m}, tracker)
    return m


def report(c, evals, rewards, tracker):
    """The run's evaluated rounds as eval_table.md, eval_curves.png and eval_before_after.png in out_dir,
    and the first and last side by side on the terminal."""
    first, last = min(evals), max(evals)
    text = evaluation.report(c, {c.out_dir: c}, {c.out_dir: evals}, {c.out_dir: rewards}, c.out_dir)
    if tracker is not None:
        tracker.log({"round": last, **{f[:-4]: tracker.Image(os.path.join(c.out_dir, f)) for f in
                                       ("eval_curves.png", "eval_before_after.png") if os.path.isfile(os.path.join(c.out_dir, f))}})
    print(f"\nbefore (round {first}) and after (round {last}) on the evaluation prompts:")
    print(evaluation.table({c.out_dir: {first: evals[first], last: evals[last]}}))
    trained = text.partition(evaluation.TRAINED)[2]  # the training prompts, when the figure shows them
    if trained:
        print(f"\n{evaluation.TRAINED}{trained}")
    print(f"\nthe before / after figure: {os.path.join(c.out_dir, 'eval_before_after.png')}")


def main(argv=None, **forced):
    c = config(argv, **forced)
    rank, world, c.device = init_dist(c.device)
    prepare_world(c, rank, world)
    validate(c, rank, world)
    if rank == 0:
        run_folder.lock(c.out_dir)  # one run at a time in out_dir
    start = run_folder.open_run(c, rank, world)  # 0 for a new run (round_0000: the base models), or the last saved round
    tracker = run_folder.open_tracker(c, rank)  # wandb, with wandb_log
    if rank == 0 and c.backbone == "llamagen":  # T5 runs once for every prompt of the run; the stages read the cache
        texts = read_prompts(c.train_prompts) + ([t for _, t in common.read_pairs(c.train_pairs)] if c.mode == "sft" else [])
        common.fill_caption_cache(c, texts)
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
        run_folder.sample_grid(c, policy.policy, policy.vq, os.path.join(d, "samples.png"))
    evals, rewards = run_folder.read_log(c.out_dir)  # a resumed run's, up to its start
    if c.eval_every and start not in evals and (start == 0 or start % c.eval_every == 0 or start == c.rounds):
        evals[start] = evaluate(c, start, rank, world, tracker)  # round 0, or one a killed run saved but never evaluated
    handover = os.path.join(c.out_dir, "handover")  # this round's rollouts and decoder, for the other stage
    rollouts_file = os.path.join(handover, "rollouts.safetensors")
    per_rank = decoder is not None and c.decoder_sync == "per_rank"  # each rank hands its own decoder to itself
    decoder_file = os.path.join(handover, f"decoder_rank{rank}.safetensors" if per_rank else "decoder.safetensors")
    os.makedirs(handover, exist_ok=True)
    run_t0 = time.time()
    for rnd in range(start + 1, c.rounds + 1):
        t0 = time.time()
        if c.mode == "sft":
            m = train_sft.run(policy, c, rnd, rank, world)
        else:  # Stage 1: GRPO on the policy with the decoder fixed (Eq. 3); its rollouts go to Stage 2 as a file
            rollouts, m = train_policy.run(policy, c, rnd, rank, world)
            if rank == 0:
                train_policy.save_rollouts(rollouts, c, rnd, rollouts_file)
            barrier(world)
        if decoder is not None:  # Stage 2: the decoder adapts to those rollouts, the policy fixed (Eq. 4-8)
            m.update(train_decoder.run(decoder, c, rnd, rollouts_file, rank, world))
            if rank == 0 or per_rank:
                save_decoder(decoder.vq if c.reward_decoder == "decoder" else decoder.ema, decoder_file)
            barrier(world)
            train_policy.set_decoder(policy, decoder_file)  # the next round's rewards see this decoder
        evaluated = c.eval_every and (rnd % c.eval_every == 0 or rnd == c.rounds)
        if rank == 0:
            if rnd % c.save_every == 0 or rnd == c.rounds or evaluated or (c.sample_every and rnd % c.sample_every == 0):
                run_folder.save_round(c, rnd, policy, decoder, rollouts_file, m)
            m["round_time_s"], rewards[rnd] = time.time() - t0, m.get("reward")
            run_folder.log_metrics(c.out_dir, {"round": rnd, "time": time.time(), **m}, tracker)
            print(run_folder.log_line(rnd, m) + f" | eta {run_folder.eta(time.time() - run_t0, rnd - start, c.rounds - rnd)}",
                  flush=True)
        barrier(world)
        if evaluated:
            evals[rnd] = evaluate(c, rnd, rank, world, tracker)
    if rank == 0 and len(evals) > 1:  # eval_table.md, eval_curves.png and eval_before_after.png in out_dir
        report(c, evals, rewards, tracker)
    if tracker is not None:
        tracker.finish()
    if rank == 0:
        run_folder.unlock(c.out_dir)
    if world > 1:
        dist.destroy_process_group()
    return c


if __name__ == "__main__":
    common.plain_errors()
    main()
