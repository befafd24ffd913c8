"""Stage 2 of RankE: the decoder adapts to the policy's fresh rollouts, the policy fixed (Eq. 4-8).

    L_dec = lambda_bp L_BP + lambda_gan L_RankGAN + lambda_rec L_rec + lambda_cons L_cons

on a step's rollouts (whole prompt groups, ranked by the rewards they got at rollout time, their codes
re-decoded by the decoder being trained) and real training images (their ground-truth codes from the
frozen encoder), in chunks; then the EMA decoder's update, then the discriminator's hinge step against
the real images. Only post_quant_conv + decoder train; the encoder and the
codebook stay frozen so the policy's codes keep their meaning. Where the authors' released code does
otherwise (the best rollout of each group only, a discriminator that learns from reconstructions,
LPIPS consistency, ...), a switch below says so; config/released.py sets them all.

ranke.py keeps this stage's state (`init`) in memory across rounds and calls `run` once a round on the
rollouts file Stage 1 just wrote; the decoder it leaves is handed back to Stage 1 as a file. Alone, on a
rollouts file, starting from a round folder's decoder:

    python train_decoder.py [RUN_CONFIG] --rollouts=out/ranke/round_0010/rollouts.safetensors \\
        --init_from=out/ranke/round_0009 --out_dir=out/stage2

with the settings at the top of this file (and common.py's), as the loop runs them.
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

import common
from checkpoint import read_state_dict
from common import (AT_LEAST_1, BETAS, NON_NEGATIVE, POSITIVE, UNIT, all_reduce_grads, autocast, bad_switch,
                    check_finite, check_weights, encode_once, grad_scaler, largest_weight, load_image, load_optimizer,
                    mean_stats, out_of_range, peak_memory_gb, read_pairs, read_prompts, reset_peak_memory, rng,
                    save_model, save_optimizer, split_hint)
from losses import (LPIPS, adaptive_weight, bp_loss, cons_loss, disc_loss, ema_update, gen_adv_loss, in_fp32, patchgan,
                    rank_gan_loss, rank_weights, rec_loss, reward_terms, run_reward, schedule, top_k_weights)
from model_vq import decoder_parameters, load_decoder, load_vq, save_decoder

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and this project reconstructs. --
decoder_steps = 3  # decoder steps per round
decoder_lr = 3e-5  # LlamaGen-XL: 1e-5 (r); 1e-4 lets the shapes decoder drift (L_rec doubles)
decoder_weight_decay = 0.05
decoder_betas = (0.5, 0.9)
disc_lr = 3e-5  # LlamaGen-XL: 1e-5 (r)
disc_weight_decay = 0.05
disc_betas = (0.5, 0.9)
disc_ndf = 64
disc_layers = 3
disc_start = 0  # decoder steps (over the whole run) before the GAN terms turn on
disc_weight = 1.0  # scales the discriminator's loss and every GAN term of the decoder (the release: 0.5)
disc_fakes = "policy"  # the discriminator's fakes: 'policy' (the decodings Rank-GAN trains) |
#                        'reconstructions' (of the real images' ground-truth codes: the release)
rec_gan = False  # L_rec gains the tokenizer's GAN term on its reconstructions, with VQGAN's adaptive weight (the release)
gen_loss = "hinge"  # generator side of the GAN: 'hinge' | 'non_saturating'
lambda_bp = 0.1  # Eq. 5 (r); 0 for a black-box reward
lambda_gan = 0.1  # Eq. 6; the paper: 0.5 (r), config/llamagen_xl_clip.py. On the shapes world 0.5 lets the discriminator win
#                  and the decoder drift (held-out rec_L1 +73% in 10 rounds; docs/history_shapes_base_3000.md)
lambda_rec = 4.0  # Eq. 7; the paper: 1.0 (r), config/llamagen_xl_clip.py. On the shapes world 1.0 lets the decoder drift
#                  (held-out rec_L1 +11% in 30 steps; +6% with no GAN at all), 4 holds it within 3% (docs/history_shapes_base_3000.md)
lambda_cons = 1.0  # Eq. 8 (r); 10 drifts, 50 collapses the decoder
cons_kind = "mse"  # L_cons: 'mse' (Eq. 8) | 'lpips' (the release; needs lpips_vgg / lpips_lin)
cons_schedule = "none"  # lambda_cons over the run's decoder steps: 'none' | 'linear' | 'sin', from
cons_start_step, cons_end_step = 0, 1000  # cons_start_value (until cons_start_step) to cons_end_value
cons_start_value, cons_end_value = 0.0, 1.0  # (from cons_end_step)
disc_first = False  # the discriminator's step before the decoder's in each step (the release) | after (the paper)
clamp_policy_images = False  # the policy decodings clamped to [-1, 1] before the discriminator and L_cons (the release)
selection = "rank_softmax"  # the rollouts Stage 2 trains on, and their weights (Eq. 6): 'rank_softmax' (every rollout
#                             of the groups drawn, w = G softmax(r / tau) in each) | 'top_k' (the select_k best of each
#                             group, w = K softmax(r / T))
tau = 0.1  # rank_softmax: the temperature; inf = uniform GAN, small = hard best-of-N
rank_softmax = "group"  # rank_softmax: 'group' (w = G softmax within each prompt's group) | 'batch' (the step's)
select_k = 1  # top_k: rollouts kept per group (the release: 1, weight 1)
select_temp_start, select_temp_end = 4.0, 1.0  # top_k: T anneals (half a cosine) between them over the first
select_anneal = 0.2  # fraction of the run's decoder steps (inert with select_k = 1)
ema_decay = 0.999
ema_updates = 1  # EMA decoder updates a step; the release's Janus trainer (accumulation 2) updates it at every
#                  micro-step, also the one whose optimizer step accelerate skips: 2 (the first toward the unchanged decoder)
rec_kind = "l1"  # 'l1' | 'l2'
perceptual_weight = 1.0
lpips_vgg = ""  # torchvision vgg16-397923af.pth; with lpips_lin, turns LPIPS on in L_rec
lpips_lin = ""  # LPIPS heads vgg.pth (taming / LlamaGen)
decoder_batch = 2  # rollouts per forward pass
real_batch = 1  # real images per forward pass
real_images = "drawn"  # the real images of a chunk: 'drawn' (real_batch of train_pairs at random) | 'prompts' (one image of
#                        each of the chunk's prompts, a pair captioned with it: the release, whose batches are pairs)
decoder_chunks = 8  # forward passes per step, dealt to ranks (the world must divide it); a step takes
#                     decoder_chunks x decoder_batch rollouts (whole prompt groups: 16 = 2 groups here)
decoder_grad_clip = 1.0
decoder_sync = "all_reduce"  # the decoder's gradients: 'all_reduce' (one decoder, averaged over ranks: the paper) |
#                             'per_rank' (each rank trains its own decoder and EMA decoder on the groups its rank
#                             drew in Stage 1, and its rewards come from it; round folders keep rank 0's. The
#                             release's LlamaGen trainer does this, its decoder's forward bypassing DDP; the
#                             discriminator stays shared, as there)
rollouts = ""  # standalone: the rollouts file to train on
init_from = ""  # standalone: the round folder to start from
SWITCHES = {"disc_fakes": ("policy", "reconstructions"), "gen_loss": ("hinge", "non_saturating"),
            "cons_kind": ("mse", "lpips"), "cons_schedule": ("none", "linear", "sin"),
            "selection": ("rank_softmax", "top_k"), "rank_softmax": ("group", "batch"), "rec_kind": ("l1", "l2"),
            "decoder_sync": ("all_reduce", "per_rank"), "real_images": ("drawn", "prompts")}
RANGES = {"decoder_steps": AT_LEAST_1, "decoder_lr": POSITIVE, "decoder_weight_decay": NON_NEGATIVE,
          "decoder_betas": BETAS, "disc_lr": POSITIVE, "disc_weight_decay": NON_NEGATIVE, "disc_betas": BETAS,
          "disc_ndf": AT_LEAST_1, "disc_layers": AT_LEAST_1, "disc_start": NON_NEGATIVE, "disc_weight": NON_NEGATIVE,
          "lambda_bp": NON_NEGATIVE, "lambda_gan": NON_NEGATIVE, "lambda_rec": NON_NEGATIVE, "lambda_cons": NON_NEGATIVE,
          "tau": (lambda v: v > 0, "> 0 (inf = uniform weights; small = nearly best-of-N)"), "select_anneal": NON_NEGATIVE,
          "ema_decay": UNIT, "ema_updates": AT_LEAST_1, "perceptual_weight": NON_NEGATIVE, "decoder_batch": AT_LEAST_1, "real_batch": AT_LEAST_1,
          "decoder_chunks": AT_LEAST_1, "decoder_grad_clip": POSITIVE}

_lpips_said = False


def check(c, world=1):
    """This stage's settings on `world` ranks: the first that cannot run, as a message saying how to fix
    it; '' if none (ranke.py and this script alone run the same checks)."""
    msg = bad_switch(c, SWITCHES) or out_of_range(c, RANGES)
    if msg:
        return msg
    if c.selection != "top_k" and c.decoder_chunks * c.decoder_batch % c.group_size:
        return (f"a decoder step takes whole prompt groups: decoder_chunks x decoder_batch ({c.decoder_chunks} x "
                f"{c.decoder_batch}) must be a multiple of group_size ({c.group_size})")
    if c.decoder_chunks % world:
        step = c.group_size // math.gcd(c.group_size, c.decoder_batch)
        return (f"a decoder step's {c.decoder_chunks} chunks (decoder_chunks) cannot be dealt evenly to {world} "
                f"ranks: set decoder_chunks={split_hint(c.decoder_chunks, world, step)}")
    share = c.decoder_chunks // world * c.decoder_batch  # a rank's rollouts a step
    if c.decoder_sync == "per_rank" and world > 1 and share % (c.select_k if c.selection == "top_k" else c.group_size):
        return (f"decoder_sync=per_rank trains each rank on whole groups of its own: a rank's decoder_chunks / world x "
                f"decoder_batch ({share}) must be a multiple of {'select_k' if c.selection == 'top_k' else 'group_size'}")
    if "hpsv2" in reward_terms(c) and c.lambda_bp > 0:
        return "HPSv2 is a black-box reward: set lambda_bp=0 (Rank-GAN carries its signal to the decoder)"
    if not (1 <= c.select_k <= c.group_size and c.decoder_chunks * c.decoder_batch % c.select_k == 0):
        return f"select_k ({c.select_k}) must be within 1..group_size and divide decoder_chunks x decoder_batch"
    if min(c.select_temp_start, c.select_temp_end) <= 0:
        return "select_temp_start and select_temp_end must be > 0"
    if c.real_images == "prompts":
        prompts = read_prompts(c.train_prompts)
        missing = [p for p, of in zip(prompts, images_of_prompts(prompts, read_pairs(c.train_pairs))) if of is None]
        if missing:
            return f"real_images=prompts needs an image of every training prompt in train_pairs: {missing[0]!r} has none"
    if c.cons_kind == "lpips" and not (c.lpips_vgg and c.lpips_lin):
        return "cons_kind=lpips needs LPIPS weights: set lpips_vgg and lpips_lin (or cons_kind=mse)"
    return ""


@dataclass
class Decoder:
    """Stage 2's state, in memory from round to round."""
    vq: nn.Module  # the base tokenizer: its post_quant_conv + decoder train, its encoder and codebook frozen
    ema: nn.Module  # the EMA decoder (L_cons's target)
    disc: nn.Module  # the PatchGAN
    opt: torch.optim.Optimizer  # the decoder's AdamW
    opt_d: torch.optim.Optimizer  # the discriminator's
    scaler: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    reward: Callable  # for L_BP
    prompts: list  # the training prompts (the rollouts name them by index)
    pairs: list  # the real training images and their captions
    lpips: nn.Module = None  # L_rec's perceptual term (and L_cons with cons_kind = 'lpips')
    gt_codes: dict = field(default_factory=dict)  # the real images' ground-truth codes, by pair, encoded once
    images_of_prompt: list = None  # real_images = 'prompts': the pairs captioned with each training prompt


@dataclass
class Chunk:
    """A forward pass of a decoder step: selected rollouts, and real images with their ground-truth codes."""
    codes: torch.Tensor  # the rollouts' codes
    sel_w: torch.Tensor  # their weights (Eq. 6)
    texts: list  # their prompts (L_BP)
    real: torch.Tensor  # real training images ...
    gt_codes: torch.Tensor  # ... and their codes from the frozen encoder (L_rec)
    fakes: torch.Tensor = None  # the discriminator's fakes, left by decoder_terms


def init(c, d, reward=None, rank=0):
    """Stage 2's state from round folder d: the decoder being trained (on the base tokenizer's frozen
    encoder and codebook), its EMA, the discriminator, their AdamW states, LPIPS, the real images."""
    global _lpips_said
    dev = c.device
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, "decoder.safetensors")).to(dev)
    vq.requires_grad_(False)
    for p in decoder_parameters(vq):
        p.requires_grad_(True)
    ema = load_decoder(copy.deepcopy(vq), os.path.join(d, "decoder_ema.safetensors")).requires_grad_(False)
    with torch.random.fork_rng():  # the same initial discriminator on every rank and world size
        torch.manual_seed(c.seed)
        disc = patchgan(3, c.disc_ndf, c.disc_layers).to(dev)
    if os.path.isfile(os.path.join(d, "disc.safetensors")):
        disc.load_state_dict(read_state_dict(os.path.join(d, "disc.safetensors")))
    lpips = None
    if c.lpips_vgg and c.lpips_lin:
        lpips = LPIPS(c.lpips_vgg, c.lpips_lin).to(dev)
    elif rank == 0 and not _lpips_said and c.perceptual_weight > 0:
        print("L_rec runs without its perceptual term: set lpips_vgg and lpips_lin to local LPIPS weights to add it")
        _lpips_said = True
    opt = torch.optim.AdamW(decoder_parameters(vq), lr=c.decoder_lr, betas=c.decoder_betas,
                            weight_decay=c.decoder_weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=c.disc_betas, weight_decay=c.disc_weight_decay)
    scaler, scaler_d = grad_scaler(c), grad_scaler(c)
    load_optimizer(opt, os.path.join(d, "opt_decoder.safetensors"), scaler)
    load_optimizer(opt_d, os.path.join(d, "opt_disc.safetensors"), scaler_d)
    prompts, pairs = read_prompts(c.train_prompts), read_pairs(c.train_pairs)
    return Decoder(vq, ema, disc, opt, opt_d, scaler, scaler_d, reward, prompts, pairs, lpips,
                   images_of_prompt=images_of_prompts(prompts, pairs) if c.real_images == "prompts" else None)


def images_of_prompts(prompts, pairs):
    """For each prompt, the indices of the pairs captioned with it (None if none)."""
    of = {}
    for i, (_, caption) in enumerate(pairs):
        of.setdefault(caption, []).append(i)
    return [of.get(p) for p in prompts]


def run(s, c, rnd, rollouts_path, rank=0, world=1):
    """`decoder_steps` decoder steps of round `rnd` on the rollouts in `rollouts_path`: each selects and
    weights whole prompt groups (Eq. 6), takes the decoder's step on its terms (Eq. 4), updates the EMA
    decoder, and the discriminator's (after the decoder's: the paper; before: disc_first, the release)."""
    t0, dev = time.time(), c.device
    reset_peak_memory(dev)
    R = read_state_dict(rollouts_path)
    check_rollouts(c, rollouts_path, R)
    start_weight = largest_weight(decoder_parameters(s.vq))
    stats, bar = [], range(c.decoder_steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 2 (decoder)", leave=False)
    for step in bar:
        global_step = (rnd - 1) * c.decoder_steps + step  # over the whole run, from 0
        gan_on = (c.lambda_gan > 0 or c.rec_gan) and global_step >= c.disc_start
        idx, sel_w = select(c, R, rnd, step, global_step, world)
        chunks = load_chunks(s, c, R, idx, sel_w, rnd, step, rank, world)
        if gan_on and c.disc_first:  # the release's order: the discriminator sees this step's decodings first
            with torch.no_grad(), autocast(c):
                for ch in chunks:
                    ch.fakes = s.vq.decode(ch.gt_codes if c.disc_fakes == "reconstructions" else ch.codes)
            disc_step(s, c, chunks, world, step, stats)
        for ch in chunks:  # Eq. 4, its gradients accumulated over the chunks
            terms, weights = decoder_terms(s, c, ch, gan_on, global_step)
            for k, v in terms.items():
                check_finite(v, k, step)
            s.scaler.scale(sum(weights[k] * v for k, v in terms.items()) / len(chunks)).backward()
            stats.append({k: v.item() for k, v in terms.items()})
        if c.decoder_sync == "all_reduce":
            all_reduce_grads(decoder_parameters(s.vq), world)
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(decoder_parameters(s.vq), c.decoder_grad_clip)
        for _ in range(c.ema_updates - 1):  # the release's micro-steps that do not step the decoder
            ema_update(s.ema, s.vq, c.ema_decay)
        s.scaler.step(s.opt)
        s.scaler.update()
        s.opt.zero_grad(set_to_none=True)  # no gradients are held between steps, nor while Stage 1 runs
        ema_update(s.ema, s.vq, c.ema_decay)
        if gan_on and not c.disc_first:  # the paper's order: the discriminator then learns from this step's fakes
            disc_step(s, c, chunks, world, step, stats)
    check_weights(decoder_parameters(s.vq), "decoder", start_weight)
    metrics = mean_stats(stats, world, dev)
    metrics.update(decoder_time_s=time.time() - t0, decoder_peak_gb=peak_memory_gb(dev))
    return metrics


def select(c, R, rnd, step, global_step, world=1):
    """A step's rollouts (indices into R, in chunk order) and their weights: whole prompt groups, ranked
    within each group (Eq. 6: w = G softmax(r / tau)) or across the step (rank_softmax = 'batch'); or
    (selection = 'top_k', the release) the select_k best of each group, weighted K softmax(r / T) as T
    anneals. With decoder_sync = 'per_rank' each rank's chunks hold only the groups its own rank drew in
    Stage 1 (the release: a GPU's decoder learns from its GPU's rollouts)."""
    n_groups = len(R["rewards"]) // c.group_size
    per_step = c.decoder_chunks * c.decoder_batch // (c.select_k if c.selection == "top_k" else c.group_size)
    if c.decoder_sync != "per_rank" or world == 1:
        return pick(c, R, torch.arange(n_groups), per_step, rng(c.seed, rnd, step, "groups"), global_step)
    n_chunks = c.prompts_per_step // c.prompts_per_chunk  # Stage 1 deals its chunk k to rank k % world
    owner = torch.arange(n_groups) // c.prompts_per_chunk % n_chunks % world
    parts = [pick(c, R, (owner == r).nonzero()[:, 0], per_step // world, rng(c.seed, rnd, step, "groups", r),
                  global_step) for r in range(world)]
    # rank r takes chunks r, r + world, ...: its j-th chunk is its own part's j-th
    return tuple(torch.stack([p[i].view(-1, c.decoder_batch) for p in parts], 1).flatten() for i in (0, 1))


def pick(c, R, pool, n, gen, global_step):
    """n groups of `pool` in a random order (cycled if the pool is smaller), selected and weighted."""
    G, top_k = c.group_size, c.selection == "top_k"
    groups = pool[torch.randperm(len(pool), generator=gen)].repeat(n // len(pool) + 1)
    idx = (groups[:n, None] * G + torch.arange(G)).flatten()
    if not top_k:
        return idx, rank_weights(R["rewards"][idx], c.tau, G if c.rank_softmax == "group" else None)
    temp = schedule("sin", global_step, 0, c.select_anneal * c.rounds * c.decoder_steps,
                    c.select_temp_start, c.select_temp_end)
    keep, sel_w = top_k_weights(R["rewards"][idx], G, c.select_k, temp)
    return idx[keep], sel_w


def load_chunks(s, c, R, idx, sel_w, rnd, step, rank, world):
    """This rank's chunks of the step: decoder_batch selected rollouts (codes, weights, prompts) and real
    training images with their ground-truth codes: real_batch drawn by (seed, round, step, chunk), or
    (real_images = 'prompts') one of each of the chunk's prompts."""
    chunks = []
    for k in range(rank, c.decoder_chunks, world):
        rows = idx[k * c.decoder_batch:(k + 1) * c.decoder_batch]
        g = rng(c.seed, rnd, step, k, "real")
        if c.real_images == "prompts":
            real_idx = []
            for p in dict.fromkeys(R["prompt_ids"][rows].tolist()):
                of = s.images_of_prompt[p]
                real_idx.append(of[torch.randint(len(of), (1,), generator=g).item()])
        else:
            real_idx = torch.randint(len(s.pairs), (c.real_batch,), generator=g).tolist()
        real = torch.stack([load_image(s.pairs[i][0], c.image_size) for i in real_idx]).to(c.device)
        chunks.append(Chunk(R["codes"][rows].to(c.device), sel_w[k * c.decoder_batch:(k + 1) * c.decoder_batch].to(c.device),
                            [s.prompts[i] for i in R["prompt_ids"][rows]], real,
                            encode_once(s.gt_codes, s.vq, real_idx, lambda i: real[real_idx.index(i)]).to(c.device)))
    return chunks


def decoder_terms(s, c, ch, gan_on, global_step):
    """Eq. 4's terms on a chunk and their weights: L_rec on the real images' ground-truth codes (Eq. 7),
    L_cons to the EMA decoder on the rollouts (Eq. 8), L_BP (Eq. 5) and Rank-GAN (Eq. 6) on the rollouts'
    decodings; with rec_gan (the release) the tokenizer's GAN term on the reconstructions. Leaves the
    discriminator's fakes in ch.fakes."""
    top_k = c.selection == "top_k"
    lambda_cons = c.lambda_cons if c.cons_schedule == "none" else schedule(
        c.cons_schedule, global_step, c.cons_start_step, c.cons_end_step, c.cons_start_value, c.cons_end_value)
    weights = {"L_rec": c.lambda_rec, "L_cons": lambda_cons, "L_BP": c.lambda_bp, "L_RankGAN": c.lambda_gan * c.disc_weight}
    with autocast(c):
        images = s.vq.decode(ch.codes)
        recon = s.vq.decode(ch.gt_codes)
        with torch.no_grad():
            ema_images = s.ema.decode(ch.codes)
        if c.clamp_policy_images:
            images, ema_images = images.clamp(-1, 1), ema_images.clamp(-1, 1)
        terms = {"L_rec": rec_loss(recon, ch.real, c.rec_kind, s.lpips, c.perceptual_weight),
                 "L_cons": cons_loss(images, ema_images, None if c.cons_kind == "mse" else
                                     in_fp32(s.lpips) if c.score_fp32 else s.lpips)}
        if c.lambda_bp > 0:  # Eq. 5; top_k weights it as the release does (weight 1 at select_k = 1)
            terms["L_BP"] = bp_loss(s.reward, images, ch.texts, ch.sel_w if top_k else None)
        if gan_on and c.lambda_gan > 0:
            terms["L_RankGAN"] = rank_gan_loss(s.disc(images), ch.sel_w, c.gen_loss)
        if gan_on and c.rec_gan:  # the tokenizer's own GAN term on the reconstructions (VQGAN's weight)
            terms["L_GAN_rec"] = gen_adv_loss(s.disc(recon), c.gen_loss).mean()
            weights["L_GAN_rec"] = c.lambda_rec * c.disc_weight * adaptive_weight(
                terms["L_rec"], terms["L_GAN_rec"], s.vq.decoder.conv_out.weight)
    ch.fakes = (recon if c.disc_fakes == "reconstructions" else images).detach()
    return terms, weights


def disc_step(s, c, chunks, world, step, stats):
    """The discriminator's hinge step: the chunks' real training images against their `fakes` (policy
    decodings, or reconstructions of the real images' codes), scaled by disc_weight."""
    s.opt_d.zero_grad(set_to_none=True)  # also drops what the decoder's GAN terms left in the discriminator
    for ch in chunks:
        with autocast(c):
            d_loss, acc = disc_loss(s.disc(ch.real), s.disc(ch.fakes))
        check_finite(d_loss, "discriminator loss", step)
        s.scaler_d.scale(c.disc_weight * d_loss / len(chunks)).backward()
        stats.append({"L_disc": d_loss.item(), "disc_acc": acc})
    all_reduce_grads(s.disc.parameters(), world)
    s.scaler_d.step(s.opt_d)
    s.scaler_d.update()


def save(s, d):
    """The stage's state into folder d (rank 0): decoder, EMA decoder, discriminator, AdamW states."""
    save_decoder(s.vq, os.path.join(d, "decoder.safetensors"))
    save_decoder(s.ema, os.path.join(d, "decoder_ema.safetensors"))
    save_model(s.disc, os.path.join(d, "disc.safetensors"))
    save_optimizer(s.opt, os.path.join(d, "opt_decoder.safetensors"), s.scaler)
    save_optimizer(s.opt_d, os.path.join(d, "opt_disc.safetensors"), s.scaler_d)


def check_rollouts(c, path, R):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("run_id") != c.run_id or meta.get("prompts_sha1") != c.prompts_sha1:
        raise ValueError(f"{path} comes from another run (run_id {meta.get('run_id')}, this run "
                         f"{c.run_id}) or another prompt file: Stage 2 trains on its own run's rollouts")
    codes = R["codes"]
    if codes.shape[1] != c.block_size or codes.max() >= c.codebook_size or len(codes) % c.group_size:
        raise ValueError(f"{path}: rollouts of shape {tuple(codes.shape)} do not fit {c.vq_model} at "
                         f"{c.image_size} px with group_size {c.group_size}")


if __name__ == "__main__":
    common.plain_errors()
    c = common.standalone_config(sys.modules[__name__])
    if not os.path.isfile(c.rollouts):
        raise SystemExit(f"give --rollouts=FILE, a rollouts.safetensors of the same run (got {c.rollouts!r})")
    reward = run_reward(c) if c.lambda_bp > 0 else None
    s = init(c, c.init_from, reward)
    m = run(s, c, c.round, c.rollouts)
    common.standalone_finish(c, m, lambda folder: save(s, folder))
