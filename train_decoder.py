"""Stage 2 of RankE: the decoder adapts to the policy's fresh rollouts, the policy fixed (Eq. 4-8).

    L_dec = lambda_bp L_BP + lambda_gan L_RankGAN + lambda_rec L_rec + lambda_cons L_cons

on a step's rollouts (whole prompt groups, ranked by the rewards they got at rollout time, their codes
re-decoded by the decoder being trained) and real training images (their ground-truth codes from the
frozen encoder), in chunks. Then the discriminator's hinge step against the real
images, and the EMA decoder's update. Only post_quant_conv + decoder train; the encoder and the
codebook stay frozen so the policy's codes keep their meaning.

ranke.py keeps this stage's state (`init`) in memory across rounds and calls `run` once a round on the
rollouts file Stage 1 just wrote; the decoder it leaves is handed back to Stage 1 as a file. Alone, on a
rollouts file, starting from a round folder's decoder:

    python train_decoder.py --rollouts=out/ranke/round_0004/rollouts.safetensors \\
        --init_from=out/ranke/round_0003 --out_dir=out/stage2
"""
import copy
import os
import sys
import time
from types import SimpleNamespace

import torch

import common
from checkpoint import read_state_dict
from common import (all_reduce_grads, autocast, check_finite, grad_scaler, load_image, load_optimizer, mean_stats,
                    peak_memory_gb, read_pairs, read_prompts, reset_peak_memory, rng, save_model, save_optimizer)
from losses import (LPIPS, adaptive_weight, bp_loss, cons_loss, disc_loss, ema_update, run_reward,
                    patchgan, rank_gan_loss, rank_weights, rec_loss)
from model_vq import decoder_parameters, load_decoder, load_vq, save_decoder

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and NOTES.md reconstructs. --
decoder_steps = 3  # decoder steps per round
decoder_lr = 3e-5  # LlamaGen-XL: 1e-5 (r); 1e-4 lets the shapes decoder drift (L_rec doubles)
decoder_weight_decay = 0.05
decoder_betas = (0.5, 0.9)
disc_lr = 3e-5  # LlamaGen-XL: 1e-5 (r)
disc_ndf = 64
disc_layers = 3
disc_start = 0  # decoder steps (over the whole run) before the GAN terms turn on
disc_adaptive_weight = False  # VQGAN's |grad L_rec| / |grad L_gan| at the last layer (LlamaGen: off)
gen_loss = "hinge"  # generator side of the GAN: 'hinge' | 'non_saturating'
lambda_bp = 0.1  # Eq. 5 (r); 0 for a black-box reward
lambda_gan = 0.5  # Eq. 6 (r)
lambda_rec = 1.0  # Eq. 7 (r)
lambda_cons = 1.0  # Eq. 8 (r); 10 drifts, 50 collapses the decoder
tau = 0.1  # Eq. 6 temperature; inf = uniform GAN, small = hard best-of-N
rank_softmax = "group"  # 'group': w = G softmax within each prompt's group | 'batch': over the step's rollouts
ema_decay = 0.999
rec_kind = "l1"  # 'l1' | 'l2'
perceptual_weight = 1.0
lpips_vgg = ""  # torchvision vgg16-397923af.pth; with lpips_lin, turns LPIPS on in L_rec
lpips_lin = ""  # LPIPS heads vgg.pth (taming / LlamaGen)
decoder_batch = 2  # rollouts per forward pass
real_batch = 1  # real images per forward pass
decoder_chunks = 8  # forward passes per step, dealt to ranks (the world must divide it); a step takes
#                     decoder_chunks x decoder_batch rollouts (whole prompt groups: 16 = 2 groups here)
decoder_grad_clip = 1.0
rollouts = ""  # standalone: the rollouts file to train on
init_from = ""  # standalone: the round folder to start from

_lpips_said = False


def init(c, d, reward=None, rank=0):
    """Stage 2's state from round folder d: the decoder being trained (on the base tokenizer's frozen
    encoder and codebook), its EMA, the discriminator, their AdamW states, LPIPS, the real images."""
    global _lpips_said
    dev, s = c.device, SimpleNamespace(reward=reward)
    s.prompts, s.pairs = read_prompts(c.train_prompts), read_pairs(c.train_pairs)
    s.vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, "decoder.safetensors")).to(dev)
    s.vq.requires_grad_(False)
    for p in decoder_parameters(s.vq):
        p.requires_grad_(True)
    s.ema = load_decoder(copy.deepcopy(s.vq), os.path.join(d, "decoder_ema.safetensors")).requires_grad_(False)
    with torch.random.fork_rng():  # the same initial discriminator on every rank and world size
        torch.manual_seed(c.seed)
        s.disc = patchgan(3, c.disc_ndf, c.disc_layers).to(dev)
    if os.path.isfile(os.path.join(d, "disc.safetensors")):
        s.disc.load_state_dict(read_state_dict(os.path.join(d, "disc.safetensors")))
    s.lpips = None
    if c.lpips_vgg and c.lpips_lin:
        s.lpips = LPIPS(c.lpips_vgg, c.lpips_lin).to(dev)
    elif rank == 0 and not _lpips_said and c.perceptual_weight > 0:
        print("L_rec runs without its perceptual term: set lpips_vgg and lpips_lin to local LPIPS weights to add it")
        _lpips_said = True
    s.opt = torch.optim.AdamW(decoder_parameters(s.vq), lr=c.decoder_lr, betas=c.decoder_betas,
                              weight_decay=c.decoder_weight_decay)
    s.opt_d = torch.optim.AdamW(s.disc.parameters(), lr=c.disc_lr, betas=c.decoder_betas, weight_decay=c.decoder_weight_decay)
    load_optimizer(s.opt, os.path.join(d, "opt_decoder.safetensors"))
    load_optimizer(s.opt_d, os.path.join(d, "opt_disc.safetensors"))
    s.scaler, s.scaler_d = grad_scaler(c), grad_scaler(c)
    return s


def run(s, c, rnd, rollouts_path, rank=0, world=1):
    """`decoder_steps` decoder steps of round `rnd` on the rollouts in `rollouts_path`."""
    t0, dev = time.time(), c.device
    reset_peak_memory(dev)
    amp, G = autocast(c), c.group_size
    R = read_state_dict(rollouts_path)
    check_rollouts(c, rollouts_path, R)
    n_groups, per_step = len(R["rewards"]) // G, c.decoder_chunks * c.decoder_batch
    stats, bar = [], range(c.decoder_steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 2 (decoder)", leave=False)
    for step in bar:
        global_step = (rnd - 1) * c.decoder_steps + step
        gan_on = c.lambda_gan > 0 and global_step >= c.disc_start
        # the step's rollouts: whole prompt groups, ranked together (Eq. 6), then cut into chunks
        groups = torch.randperm(n_groups, generator=rng(c.seed, rnd, step, "groups")).repeat(per_step // (n_groups * G) + 1)
        idx = (groups[:per_step // G, None] * G + torch.arange(G)).flatten()
        rank_w = rank_weights(R["rewards"][idx], c.tau, G if c.rank_softmax == "group" else None)
        chunks = []
        for k in range(rank, c.decoder_chunks, world):
            rows = slice(k * c.decoder_batch, (k + 1) * c.decoder_batch)
            real_idx = torch.randint(len(s.pairs), (c.real_batch,), generator=rng(c.seed, rnd, step, k, "real"))
            real = torch.stack([load_image(s.pairs[i][0], c.image_size) for i in real_idx]).to(dev)
            with torch.no_grad():
                gt_codes = s.vq.encode(real)
            chunks.append(SimpleNamespace(codes=R["codes"][idx[rows]].to(dev), rank_w=rank_w[rows].to(dev),
                                          texts=[s.prompts[i] for i in R["prompt_ids"][idx[rows]]],
                                          real=real, gt_codes=gt_codes))
        s.opt.zero_grad(set_to_none=True)
        weights = {"L_rec": c.lambda_rec, "L_cons": c.lambda_cons, "L_BP": c.lambda_bp, "L_RankGAN": c.lambda_gan}
        for ch in chunks:  # the decoder's step, Eq. 4
            with amp:
                ch.images = s.vq.decode(ch.codes)
                with torch.no_grad():
                    ema_images = s.ema.decode(ch.codes)
                terms = {"L_rec": rec_loss(s.vq.decode(ch.gt_codes), ch.real, c.rec_kind, s.lpips, c.perceptual_weight),
                         "L_cons": cons_loss(ch.images, ema_images)}
                if c.lambda_bp > 0:
                    terms["L_BP"] = bp_loss(s.reward, ch.images, ch.texts)
                w = dict(weights)
                if gan_on:
                    terms["L_RankGAN"] = rank_gan_loss(s.disc(ch.images), ch.rank_w, c.gen_loss)
                    if c.disc_adaptive_weight:
                        w["L_RankGAN"] *= adaptive_weight(terms["L_rec"], terms["L_RankGAN"], s.vq.decoder.conv_out.weight)
                loss = sum(w[k] * v for k, v in terms.items())
            for k, v in terms.items():
                check_finite(v, k, step)
            s.scaler.scale(loss / len(chunks)).backward()
            stats.append({k: v.item() for k, v in terms.items()})
        all_reduce_grads(decoder_parameters(s.vq), world)
        s.scaler.unscale_(s.opt)
        torch.nn.utils.clip_grad_norm_(decoder_parameters(s.vq), c.decoder_grad_clip)
        s.scaler.step(s.opt)
        s.scaler.update()
        ema_update(s.ema, s.vq, c.ema_decay)
        if gan_on:  # the discriminator's step: real training images against the policy's decodings
            s.opt_d.zero_grad(set_to_none=True)
            for ch in chunks:
                with amp:
                    d_loss, acc = disc_loss(s.disc(ch.real), s.disc(ch.images.detach()))
                check_finite(d_loss, "discriminator loss", step)
                s.scaler_d.scale(d_loss / len(chunks)).backward()
                stats.append({"L_disc": d_loss.item(), "disc_acc": acc})
            all_reduce_grads(s.disc.parameters(), world)
            s.scaler_d.step(s.opt_d)
            s.scaler_d.update()
    metrics = mean_stats(stats, world, dev)
    metrics.update(decoder_time_s=time.time() - t0, decoder_peak_gb=peak_memory_gb(dev))
    return metrics


def save(s, d):
    """The stage's state into folder d (rank 0): decoder, EMA decoder, discriminator, AdamW states."""
    save_decoder(s.vq, os.path.join(d, "decoder.safetensors"))
    save_decoder(s.ema, os.path.join(d, "decoder_ema.safetensors"))
    save_model(s.disc, os.path.join(d, "disc.safetensors"))
    save_optimizer(s.opt, os.path.join(d, "opt_decoder.safetensors"))
    save_optimizer(s.opt_d, os.path.join(d, "opt_disc.safetensors"))


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
    c = common.standalone_config(sys.modules[__name__])
    if not os.path.isfile(c.rollouts):
        raise SystemExit(f"give --rollouts=FILE, a rollouts.safetensors of the same run (got {c.rollouts!r})")
    reward = run_reward(c) if c.lambda_bp > 0 else None
    s = init(c, c.init_from, reward)
    m = run(s, c, c.round, c.rollouts)
    common.standalone_finish(c, m, lambda folder: save(s, folder))
