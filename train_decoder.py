"""Stage 2 of RankE: the decoder adapts to the policy's fresh rollouts, the policy fixed (Eq. 4-8).

    L_dec = lambda_bp L_BP + lambda_gan L_RankGAN + lambda_rec L_rec + lambda_cons L_cons

on a chunk of rollouts (whole prompt groups, their codes re-decoded by the decoder being trained,
ranked by the rewards they got at rollout time) and a chunk of real training images (their
ground-truth codes from the frozen encoder). Then the discriminator's hinge step against the real
images, and the EMA decoder's update. Only post_quant_conv + decoder train; the encoder and the
codebook stay frozen so the policy's codes keep their meaning.

Standalone, on a rollouts file, starting from a round folder's decoder:

    python train_decoder.py --rollouts=out/ranke/round_0004/rollouts.safetensors \\
        --init_from=out/ranke/round_0003 --out_dir=out/decoder_only
"""
import copy
import os
import time

import torch

from common import (all_reduce_grads, check_finite, load_image, load_optimizer, mean_stats,
                    peak_memory_gb, read_pairs, read_prompts, rng, save_model, save_optimizer)
from checkpoint import read_state_dict
from losses import (LPIPS, adaptive_weight, bp_loss, cons_loss, disc_loss, ema_update, load_reward,
                    patchgan, rank_gan_loss, rank_weights, rec_loss)
from model_vq import decoder_parameters, load_decoder, load_vq, save_decoder

# -- config: defaults for the shapes world. config/llamagen_xl_clip.py holds Table F.1's values, and
#    marks (r) those the paper lost and NOTES.md reconstructs. --
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
rank_softmax = "group"  # 'group': w = G softmax within each prompt's group | 'batch': over the chunk
ema_decay = 0.999
rec_kind = "l1"  # 'l1' | 'l2'
perceptual_weight = 1.0
lpips_vgg = ""  # torchvision vgg16-397923af.pth; with lpips_lin, turns LPIPS on in L_rec
lpips_lin = ""  # LPIPS heads vgg.pth (taming / LlamaGen)
decoder_batch = 16  # rollouts per forward pass on a rank (whole groups)
real_batch = 8  # real images per forward pass on a rank
decoder_chunks = 1  # forward passes per optimizer step, over all ranks (the world must divide it)
decoder_grad_clip = 1.0
rollouts = ""  # standalone: the rollouts file to train on
init_from = ""  # standalone: the round folder to start from

_lpips_said = False


def decoder_stage(c, prev, cur, rnd, steps, rollouts_path, rank=0, world=1):
    """Run `steps` decoder steps from round folder `prev` on `rollouts_path`; write the decoder,
    the EMA decoder, the discriminator and their optimizer states into `cur`."""
    global _lpips_said
    t0, dev = time.time(), c.device
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(dev)
    amp = torch.autocast(dev.split(":")[0], getattr(torch, c.dtype), enabled=dev.startswith("cuda"))
    R = read_state_dict(rollouts_path)
    check_rollouts(c, rollouts_path, R)
    prompts, pairs = read_prompts(c.train_prompts), read_pairs(c.train_pairs)
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(prev, "decoder.safetensors")).to(dev)
    vq.requires_grad_(False)
    for p in decoder_parameters(vq):
        p.requires_grad_(True)
    ema = load_decoder(copy.deepcopy(vq), os.path.join(prev, "decoder_ema.safetensors")).requires_grad_(False)
    with torch.random.fork_rng():  # the same initial discriminator on every rank and world size
        torch.manual_seed(c.seed)
        disc = patchgan(3, c.disc_ndf, c.disc_layers).to(dev)
    if os.path.isfile(os.path.join(prev, "disc.safetensors")):
        disc.load_state_dict(read_state_dict(os.path.join(prev, "disc.safetensors")))
    reward = load_reward(c.reward, dev, c.clip_model, c.clip_weights, c.clip_quick_gelu, c.hps_weights) \
        if c.lambda_bp > 0 else None
    lpips = None
    if c.lpips_vgg and c.lpips_lin:
        lpips = LPIPS(c.lpips_vgg, c.lpips_lin).to(dev)
    elif rank == 0 and not _lpips_said and c.perceptual_weight > 0:
        print("L_rec runs without its perceptual term: set lpips_vgg and lpips_lin to local LPIPS weights to add it")
        _lpips_said = True
    opt = torch.optim.AdamW(decoder_parameters(vq), lr=c.decoder_lr, betas=c.decoder_betas, weight_decay=c.decoder_weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=c.disc_lr, betas=c.decoder_betas, weight_decay=c.decoder_weight_decay)
    load_optimizer(opt, os.path.join(prev, "opt_decoder.safetensors"))
    load_optimizer(opt_d, os.path.join(prev, "opt_disc.safetensors"))
    G, n_groups = c.group_size, len(R["rewards"]) // c.group_size
    per_chunk, n_chunks = c.decoder_batch // G, c.decoder_chunks
    stats, bar = [], range(steps)
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(bar, desc=f"round {rnd} stage 2 (decoder)", leave=False)
    for step in bar:
        global_step = (rnd - 1) * steps + step
        gan_on = c.lambda_gan > 0 and global_step >= c.disc_start
        groups = torch.randperm(n_groups, generator=rng(c.seed, rnd, step, "groups"))
        groups = groups.repeat(n_chunks * per_chunk // n_groups + 1)[:n_chunks * per_chunk].view(n_chunks, per_chunk)
        batches = []
        for k in range(rank, n_chunks, world):
            idx = (groups[k][:, None] * G + torch.arange(G)).flatten()
            real_idx = torch.randint(len(pairs), (c.real_batch,), generator=rng(c.seed, rnd, step, k, "real"))
            real = torch.stack([load_image(pairs[i][0], c.image_size) for i in real_idx]).to(dev)
            with torch.no_grad():
                gt_codes = vq.encode(real)
            batches.append((R["codes"][idx].to(dev), R["rewards"][idx].to(dev),
                            [prompts[i] for i in R["prompt_ids"][idx]], real, gt_codes))
        opt.zero_grad(set_to_none=True)
        fakes = []
        for codes, rewards, texts, real, gt_codes in batches:  # the decoder's step, Eq. 4
            with amp:
                images = vq.decode(codes)
                with torch.no_grad():
                    ema_images = ema.decode(codes)
                terms = {"L_rec": rec_loss(vq.decode(gt_codes), real, c.rec_kind, lpips, c.perceptual_weight),
                         "L_cons": cons_loss(images, ema_images)}
                if c.lambda_bp > 0:
                    terms["L_BP"] = bp_loss(reward, images, texts)
                if gan_on:
                    w = rank_weights(rewards, c.tau, G if c.rank_softmax == "group" else None)
                    terms["L_RankGAN"] = rank_gan_loss(disc(images), w, c.gen_loss)
                weights = {"L_rec": c.lambda_rec, "L_cons": c.lambda_cons, "L_BP": c.lambda_bp, "L_RankGAN": c.lambda_gan}
                if gan_on and c.disc_adaptive_weight:
                    weights["L_RankGAN"] *= adaptive_weight(terms["L_rec"], terms["L_RankGAN"], vq.decoder.conv_out.weight)
                loss = sum(weights[k] * v for k, v in terms.items())
            for k, v in terms.items():
                check_finite(v, k, step)
            (loss / len(batches)).backward()
            fakes.append(images.detach())
            stats.append({k: v.item() for k, v in terms.items()})
        all_reduce_grads(decoder_parameters(vq), world)
        torch.nn.utils.clip_grad_norm_(decoder_parameters(vq), c.decoder_grad_clip)
        opt.step()
        ema_update(ema, vq, c.ema_decay)
        if gan_on:  # the discriminator's step: real training images against the policy's decodings
            opt_d.zero_grad(set_to_none=True)
            for (_, _, _, real, _), fake in zip(batches, fakes):
                with amp:
                    d_loss, acc = disc_loss(disc(real), disc(fake))
                check_finite(d_loss, "discriminator loss", step)
                (d_loss / len(batches)).backward()
                stats.append({"L_disc": d_loss.item(), "disc_acc": acc})
            all_reduce_grads(disc.parameters(), world)
            opt_d.step()
    metrics = mean_stats(stats, world, dev)
    if rank == 0:
        save_decoder(vq, os.path.join(cur, "decoder.safetensors"))
        save_decoder(ema, os.path.join(cur, "decoder_ema.safetensors"))
        save_model(disc, os.path.join(cur, "disc.safetensors"))
        save_optimizer(opt, os.path.join(cur, "opt_decoder.safetensors"))
        save_optimizer(opt_d, os.path.join(cur, "opt_disc.safetensors"))
    metrics.update(decoder_time_s=time.time() - t0, decoder_peak_gb=peak_memory_gb(dev))
    return metrics


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
    import ranke
    ranke.decoder_only_on_file()
