"""A run's folder, for ranke.py: round_NNNN folders (written as .tmp, then renamed), the base round, the
files a round did not change carried over as links, retention, resuming, and the run's log
(metrics.jsonl and the round line). The method itself is in train_policy.py and train_decoder.py.

    out_dir/round_0000/   the base: policy (= the first pi_ref) and decoder (= the first EMA decoder)
    out_dir/round_NNNN/   every save: both stages' models and optimizer states, the round's rollouts, meta.json
    out_dir/handover/     the stages' hand-over files, rewritten every round
    out_dir/metrics.jsonl a line a round, and one an evaluation
"""
import json
import os
import secrets
import shutil

import torch
from safetensors import SafetensorError

import common
from checkpoint import atomic_write
import train_decoder
import train_policy
import train_sft
from common import (autocast, barrier, caption_features, commit_round, read_meta, read_prompts, round_dir, save_grid,
                    save_model)
from model_ar import generate
from model_vq import load_vq, save_decoder

ROUND_FILES = ["policy.safetensors", "policy_ref.safetensors", "opt_policy.safetensors", "decoder.safetensors",
               "decoder_ema.safetensors", "disc.safetensors", "opt_decoder.safetensors", "opt_disc.safetensors"]
# what a resumed run must share with the run in out_dir (the world size is free: it changes no result, except
# with decoder_sync = 'per_rank', where each rank's decoder is its own)
COMPATIBLE = common.MODEL_KEYS + ("init_policy", "seed", "mode", "policy_steps", "decoder_steps", "prompts_per_step",
                                  "prompts_per_chunk", "decoder_chunks", "decoder_batch", "real_batch", "real_images",
                                  "decoder_sync", "ema_updates")


def needed_files(mode, k):
    """The files round k must hold for a run of `mode` to resume from it: the models, and after round 0
    the optimizer states (and the discriminator) of the stages the mode trains."""
    files = ["policy.safetensors", "policy_ref.safetensors", "decoder.safetensors", "decoder_ema.safetensors"]
    if k > 0 and mode != "decoder_only":
        files.append("opt_policy.safetensors")
    if k > 0 and mode in ("ranke", "decoder_only"):
        files += ["disc.safetensors", "opt_decoder.safetensors", "opt_disc.safetensors"]
    return files


def last_round(out_dir):
    """The number of the last complete round, -1 if none."""
    return max(common.saved_rounds(out_dir), default=-1)


def begin_round(out_dir, k):
    tmp = round_dir(out_dir, k) + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # what a crashed attempt left
    os.makedirs(tmp)
    return tmp


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


_held = {}  # out_dir/LOCK -> its open file, while this process runs there


def lock(out_dir):
    """Claim out_dir for this process: an exclusive flock on out_dir/LOCK, which names the holder. The
    kernel releases it when the process ends, however it ends, so a killed run leaves nothing to clean
    up; a second run into out_dir meanwhile is refused, naming the first."""
    import fcntl
    import socket
    path = os.path.abspath(os.path.join(out_dir, "LOCK"))
    if path in _held:  # this process holds it (an earlier run here raised before unlock)
        return
    os.makedirs(out_dir, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"{out_dir} is in use by {holder} (it holds a lock on {path}): wait for that run to "
                         "end, or choose another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held[path] = f


def unlock(out_dir):
    """Release out_dir (the LOCK file stays: only its lock counts)."""
    f = _held.pop(os.path.abspath(os.path.join(out_dir, "LOCK")), None)
    if f is not None:
        f.close()


def open_run(c, rank, world):
    """The round the run starts from: 0 for a new run (rank 0 writes round_0000), or the last saved round
    (or `resume_from`) of the run already in out_dir, which must be whole (every file it needs, each with
    the checksum it was saved with) and of the same settings (COMPATIBLE) and prompts. Sets c.run_id,
    which tags the run's hand-over files. A resumed run's log keeps the rounds up to its start (the later
    ones are redone); rounds after `resume_from` are set aside as round_NNNN.set_aside, not deleted."""
    saved = common.saved_rounds(c.out_dir)
    start = saved[-1] if saved and c.resume_from < 0 else c.resume_from
    if c.resume_from >= 0 and start not in saved:
        raise SystemExit(f"resume_from={start}: {c.out_dir} holds no round {start} (its saved rounds: {saved or 'none'})")
    if start >= 0 and c.resume and rank == 0:  # read every byte once, on one rank
        bad = common.verify_round(round_dir(c.out_dir, start), needed_files(c.mode, start))
        if bad:
            before = [k for k in saved if k < start]
            raise SystemExit(f"cannot resume from round {start}: {bad}. " + (
                f"Resume from the round before it with --resume_from={before[-1]} (the later rounds are set aside "
                "as round_NNNN.set_aside, nothing is deleted)" if before else "No round before it: choose another out_dir"))
    if start >= 0:
        old = read_meta(round_dir(c.out_dir, start))["config"]
        stages = (train_policy, train_decoder, train_sft)  # a key the round predates has its default
        changed = [k for k in COMPATIBLE if common.saved_setting(old, k, stages) != getattr(c, k)]
        changed += ["training prompts (train_prompts)"] if old.get("prompts_sha1") != c.prompts_sha1 else []
        if not c.resume or changed:
            raise SystemExit(f"{c.out_dir} already holds a run up to round {start}"
                             + (f" with other {', '.join(changed)}" if changed else "")
                             + ": choose another out_dir (nothing was overwritten)")
        if rank == 0:
            print(f"resuming from {round_dir(c.out_dir, start)}" + (" (last saved round)" if c.resume_from < 0 else ""))
            same = common.DERIVED + ("out_dir", "resume", "resume_from")  # compared as JSON saved them (tuples as lists)
            other = [f"{k} {old[k]!r} -> {v!r}" for k, v in sorted(vars(c).items())
                     if k in old and k not in same and old[k] != json.loads(json.dumps(v))]
            if other:  # allowed (a longer run, other evaluation or learning rates), and said
                print(f"  with settings other than round {start}'s: {', '.join(other)}")
            if start >= c.rounds:
                print(f"  round {start} >= rounds ({c.rounds}): nothing left to train (a new run needs another out_dir)")
            for k in (k for k in saved if k > start):
                aside = round_dir(c.out_dir, k) + ".set_aside"
                aside = aside if not os.path.exists(aside) else f"{aside}.{secrets.token_hex(4)}"
                os.rename(round_dir(c.out_dir, k), aside)
                print(f"  {round_dir(c.out_dir, k)} set aside as {aside}")
            log = os.path.join(c.out_dir, "metrics.jsonl")
            lines = open(log).readlines() if os.path.isfile(log) else []
            kept = [x for x in lines if (r := log_round(x)) is not None and r <= start]
            if kept != lines:
                atomic_write(log, "".join(kept))
    elif rank == 0:
        c.run_id = secrets.token_hex(8)
        os.makedirs(c.out_dir, exist_ok=True)
        base_round(c)
    barrier(world)
    start = max(start, 0)
    c.run_id = read_meta(round_dir(c.out_dir, start))["run_id"]
    return start


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


def save_round(c, rnd, policy, decoder, rollouts_file, metrics):
    """The full state after round rnd as a round folder (rank 0), written as .tmp and renamed; files
    this mode does not change are hard links to the last saved round's. Then retention: the last
    `keep_last` saves, round 0 and every `keep_every`-th stay."""
    last = round_dir(c.out_dir, last_round(c.out_dir))
    tmp = begin_round(c.out_dir, rnd)
    try:
        if policy.update:
            (train_sft if c.mode == "sft" else train_policy).save(policy, tmp)
        if decoder is not None:
            train_decoder.save(decoder, tmp)
        if os.path.isfile(rollouts_file):  # a copy: what happens to the hand-over file later cannot reach the round
            shutil.copy2(rollouts_file, os.path.join(tmp, "rollouts.safetensors"))
        carry_over(last, tmp, ROUND_FILES)
        if c.sample_every and rnd % c.sample_every == 0:
            sample_grid(c, policy.policy, policy.vq, os.path.join(tmp, "samples.png"))
        known = {os.path.join(last, n): h for n, h in read_meta(last).get("files", {}).items()}  # the linked files'
        commit_round(tmp, {"round": rnd, "run_id": c.run_id, "config": vars(c), "metrics": metrics}, known)
    except (OSError, SafetensorError) as e:  # a full disk, a permission: the last round stays as it was
        if not os.path.isdir(tmp):  # renamed into place: the round is saved, the failure was after it
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        size = sum(os.path.getsize(os.path.join(last, n)) for n in os.listdir(last))
        raise SystemExit(f"saving round {rnd} failed ({e}); nothing of it is left, and {last} is intact: resume "
                         f"from it once there is room (its files take {size / 1e9:.2f} GB; a round needs about as "
                         f"much, and {c.out_dir} has {shutil.disk_usage(c.out_dir).free / 1e9:.2f} GB free)") from None
    for old in common.saved_rounds(c.out_dir)[:-c.keep_last]:
        if old and old % c.keep_every:
            shutil.rmtree(round_dir(c.out_dir, old), ignore_errors=True)


def log_round(line):
    """The round of a metrics.jsonl line; None for a line a crash cut short."""
    try:
        return json.loads(line)["round"]
    except (ValueError, KeyError):
        return None


def read_log(out_dir):
    """The run's metrics.jsonl as ({round: its evaluation}, {round: its training reward})."""
    evals, rewards = {}, {}
    path = os.path.join(out_dir, "metrics.jsonl")
    for line in open(path) if os.path.isfile(path) else []:
        try:
            x = json.loads(line)
        except ValueError:  # a line a crash cut short
            continue
        if "eval" in x:
            evals[x["round"]] = x["eval"]
        elif "reward" in x:
            rewards[x["round"]] = x["reward"]
    return evals, rewards


def log_metrics(out_dir, record, tracker=None):
    """One line of the run's metrics.jsonl (a round's training metrics, or an evaluation); the same to the
    tracker if any, with the round's picture (its samples.png, or its evaluation's eval_grid.png)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if tracker is not None:
        if "eval" in record:
            data, picture = {f"eval/{k}": v for k, v in record["eval"].items()}, "eval_grid.png"
        else:
            data, picture = {k: v for k, v in record.items() if k not in ("round", "time")}, "samples.png"
        path = os.path.join(round_dir(out_dir, record["round"]), picture)
        if os.path.isfile(path):
            data[picture[:-4]] = tracker.Image(path)
        tracker.log({"round": record["round"], **data})


def open_tracker(c, rank):
    """Weights & Biases on rank 0 when wandb_log (nanoGPT's convention), else None. The run's id is the
    wandb run's, so a resumed run logs on, its x axis the round (a redone round is logged again);
    WANDB_MODE=offline needs no network."""
    if not c.wandb_log or rank:
        return None
    import wandb
    wandb.init(project=c.wandb_project, name=c.wandb_run_name or os.path.basename(os.path.abspath(c.out_dir)),
               id=c.run_id, resume="allow", dir=c.out_dir, config=vars(c))
    wandb.define_metric("*", step_metric="round")
    return wandb


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
