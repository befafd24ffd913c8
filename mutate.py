"""Mutation check: would the tests notice a plausible one-line bug? Each mutant below changes one
line of a copy of the project (a sign, a swapped pair, a dropped term, a missing detach, an off-by-one,
a constant); the fast tests run on each copy, and a mutant they do not fail "survived".

    python mutate.py            # every mutant (about 20 s each on 2 cores: the tests stop at the first failure)
    python mutate.py kl cfg     # the mutants whose name holds one of these words

A mutant whose original text is no longer in its file is reported as stale: keep the list in step
with the code, and add a line for every bug a review finds.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

MUTANTS = [  # (name, file, original text, mutated text)
    # Stage 1: GRPO (Eq. 3)
    ("grpo: KL term dropped", "losses.py", "loss = (pg + beta * kl).sum() / n_tokens", "loss = pg.sum() / n_tokens"),
    ("grpo: KL ratio reversed", "losses.py", "log_q_p = logp_ref - logp", "log_q_p = logp - logp_ref"),
    ("grpo: k2 without its 1/2", "losses.py", "else 0.5 * log_q_p ** 2", "else log_q_p ** 2"),
    ("grpo: k2 in place of k3", "losses.py", "kl = torch.exp(log_q_p) - log_q_p - 1 if", "kl = 0.5 * log_q_p ** 2 if"),
    ("grpo: k3 without its -1", "losses.py", "torch.exp(log_q_p) - log_q_p - 1 if", "torch.exp(log_q_p) - log_q_p if"),
    ("grpo: max instead of min", "losses.py", "pg = -torch.min(ratio * A", "pg = -torch.max(ratio * A"),
    ("grpo: ratio upside down", "losses.py", "ratio = torch.exp(logp - logp_old)", "ratio = torch.exp(logp_old - logp)"),
    ("grpo: clip range one-sided", "losses.py", "ratio.clamp(1 - clip_eps, 1 + clip_eps)", "ratio.clamp(1 - clip_eps, 1 + 2 * clip_eps)"),
    ("grpo: per-batch token count", "losses.py", "n_tokens = logp.numel() if n_tokens is None else n_tokens", "n_tokens = logp.numel()"),
    ("advantages: not centred", "losses.py", "adv = (r - r.mean(1, keepdim=True))", "adv = (r - 0 * r.mean(1, keepdim=True))"),
    ("advantages: not scaled", "losses.py", "/ (r.std(1, keepdim=True) + eps)", "/ (1 + eps)"),
    ("advantages: flat groups kept", "losses.py", "adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)", "adv = adv"),
    ("ema: moves the wrong way", "losses.py", "e.lerp_(p.to(e.dtype), 1.0 - decay)", "e.lerp_(p.to(e.dtype), decay)"),
    # Stage 2 (Eq. 4-8)
    ("rank weights: twice the temperature", "losses.py", "torch.softmax(r / tau, dim=1)", "torch.softmax(r / (2 * tau), dim=1)"),
    ("rank weights: reward sign", "losses.py", "torch.softmax(r / tau, dim=1)", "torch.softmax(-r / tau, dim=1)"),
    ("top-k: the worst kept", "losses.py", "top, order = r.topk(k, dim=1)", "top, order = r.topk(k, dim=1, largest=False)"),
    ("top-k: group offset off by one", "losses.py", "torch.arange(len(r))[:, None] * group_size", "torch.arange(len(r))[:, None] * (group_size - 1)"),
    ("schedule: sin runs backwards", "losses.py", "t = 0.5 * (1 - math.cos(math.pi * t))", "t = 0.5 * (1 + math.cos(math.pi * t))"),
    ("gan: generator sign", "losses.py", "per_patch = -logits_fake if", "per_patch = logits_fake if"),
    ("disc: real and fake swapped", "losses.py", "F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()",
     "F.relu(1 + logits_real).mean() + F.relu(1 - logits_fake).mean()"),
    ("rec: L2 for L1", "losses.py", "loss = F.l1_loss(recon, x) if kind", "loss = F.mse_loss(recon, x) if kind"),
    ("cons: teacher not detached", "losses.py", "return F.mse_loss(images, ema_images.detach())", "return F.mse_loss(images, ema_images)"),
    ("bp: sign flipped", "losses.py", "return -(r if weights is None else weights * r).mean()", "return (r if weights is None else weights * r).mean()"),
    ("adaptive weight: inverted", "losses.py", "return (g_nll.norm() / (g_adv.norm() + 1e-4))", "return (g_adv.norm() / (g_nll.norm() + 1e-4))"),
    ("reward: no clamp", "losses.py", "x = (x.float().clamp(-1, 1) + 1) / 2", "x = (x.float() + 1) / 2"),
    ("reward: crop off by one", "losses.py", "x = x[..., top:top + self.size, left:left + self.size]", "x = x[..., top + 1:top + 1 + self.size, left:left + self.size]"),
    ("reward: scale ignored", "losses.py", "sum(scale * r(x, prompts) for", "sum(r(x, prompts) for"),
    # the policy (model_ar.py)
    ("cfg: halves swapped", "model_ar.py", "return u + cfg_scale * (c - u)", "return c + cfg_scale * (u - c)"),
    ("cfg: unconditional half detached", "model_ar.py", "return u + cfg_scale * (c - u)",
     "return u.detach() + cfg_scale * (c - u.detach())"),
    ("cfg: no guidance", "model_ar.py", "return u + cfg_scale * (c - u)", "return c"),
    ("logprob: sampled token not forced in", "model_ar.py", "keep.scatter_(-1, tokens[..., None], True)", "keep = keep"),
    ("logprob: cond_only tempered", "model_ar.py", "logits = model(tokens, cond, cond_mask)\n", "logits = model(tokens, cond, cond_mask) / temperature\n"),
    ("mask: caption hidden from all", "model_ar.py", "keep[:, :C] = cond_mask.bool()", "keep[:, :C] = False"),
    ("mask: caption padding visible", "model_ar.py", "keep[:, :C] = cond_mask.bool()", "keep[:, :C] = True"),
    ("mask: not causal", "model_ar.py", "return ((causal & keep[:, None, :]) | eye)[:, None]", "return (keep[:, None, :] | eye).expand(-1, length, -1)[:, None]"),
    ("top-p: crossing token dropped", "model_ar.py", "drop[..., 1:] = drop[..., :-1].clone()", "drop = drop"),
    ("rope: sin sign", "model_ar.py", "xf[..., 0] * cos - xf[..., 1] * sin", "xf[..., 0] * cos + xf[..., 1] * sin"),
    ("kv cache: weights' dtype", "model_ar.py", "model.setup_cache(cond.shape[0], dtype)", "model.setup_cache(cond.shape[0], model.output.weight.dtype)"),
    ("t5: right padding loses the last slot", "model_ar.py", "emb[i, max_length - len(pad):] = pad", "pass"),
    ("sampler: greedy off by one", "model_ar.py", "return logits.argmax(-1, keepdim=True)", "return (logits.argmax(-1, keepdim=True) + 1) % logits.shape[-1]"),
    # the Janus policy (model_janus.py) and its VQ's names
    ("janus: unconditional row keeps the prompt", "model_janus.py", "(ids != cfg.bos_id) & (ids != cfg.boi_id), cfg.pad_id",
     "(ids == cfg.pad_id), cfg.pad_id"),
    ("janus: rotate-half sign", "model_janus.py", "torch.cat([-x2, x1], -1) * sin", "torch.cat([x2, -x1], -1) * sin"),
    ("janus: aligner without its GELU", "model_janus.py", "h = layer(F.gelu(h))", "h = layer(h)"),
    ("janus: head off by one position", "model_janus.py", "return self.head(self.language_model.norm(h[:, C - 1:]))",
     "return self.head(self.language_model.norm(h[:, C - 2:-1]))"),
    ("janus: image-start token not appended", "model_janus.py", "+ [cfg.boi_id]", "+ [cfg.pad_id]"),
    ("vq: Janus mid blocks out of order", "model_vq.py", 'MID = ("block_1", "attn_1", "block_2")', 'MID = ("block_2", "attn_1", "block_1")'),
    # the stages and the loop
    ("policy: pi_ref never updated", "train_policy.py", "ema_update(s.ref, s.policy, c.ref_decay)", "pass"),
    ("policy: kl_estimator ignored", "train_policy.py", "entropy, c.kl_estimator)", "entropy)"),
    ("policy: EMA reward decoder ignored", "train_policy.py",
     'decoder_file = "decoder.safetensors" if c.reward_decoder == "decoder" else "decoder_ema.safetensors"', 'decoder_file = "decoder.safetensors"'),
    ("policy: recompute falls back to the sampler", "train_policy.py",
     'r.logp_old = logp_sampler[rows].float() if c.old_logprobs == "sampler" else None', "r.logp_old = logp_sampler[rows].float()"),
    ("policy: advantages of minus the reward", "train_policy.py", "r.advantages, r.flat = group_advantages(r.rewards, G)",
     "r.advantages, r.flat = group_advantages(-r.rewards, G)"),
    ("policy: gradient clipped at clip_eps", "train_policy.py", "clip_grad_norm_(s.policy.parameters(), c.policy_grad_clip)",
     "clip_grad_norm_(s.policy.parameters(), c.clip_eps)"),
    ("policy: a group mixes its chunk's prompts", "train_policy.py", "ids = order[ks].flatten().repeat_interleave(G)",
     "ids = order[ks].repeat(1, G).flatten()"),
    ("policy: KL against the policy itself", "train_policy.py", "r.logp_ref = token_logprobs(s.ref,", "r.logp_ref = token_logprobs(s.policy,"),
    ("policy: pi_old taken from every epoch", "train_policy.py", "if r.logp_old is None:", "if True:"),
    ("policy: all chunks sample one stream", "model_ar.py", "generator=g) for p, g in zip(parts, generator, strict=True)",
     "generator=generator[0]) for p in parts"),
    ("policy: checkpointing ignored", "model_ar.py", "if recompute and torch.is_grad_enabled():", "if False:"),
    ("decoder: real images encoded at every draw", "common.py",
     "new = sorted({i for i in idx if i not in cache})", "new = sorted(set(idx))"),
    ("ddp: the last gradient bucket dropped", "common.py", "for group in filter(None, buckets):", "for group in buckets[:-1]:"),
    ("decoder: rank weights shuffled", "train_decoder.py", 'return idx, rank_weights(R["rewards"][idx], c.tau',
     'return idx, rank_weights(R["rewards"][idx.flip(0)], c.tau'),
    ("decoder: fakes always policy", "train_decoder.py", 'ch.fakes = (recon if c.disc_fakes == "reconstructions" else images).detach()', "ch.fakes = images.detach()"),
    ("disc: the decoder's GAN gradient kept", "train_decoder.py",
     "s.opt_d.zero_grad(set_to_none=True)  # also drops", "pass  # also drops"),
    ("decoder: EMA never updated", "train_decoder.py", "set_to_none=True)  # no gradients are held between steps, nor while Stage 1 runs\n        ema_update(s.ema, s.vq, c.ema_decay)",
     "set_to_none=True)"),
    ("decoder: per_rank still all-reduces", "train_decoder.py", 'if c.decoder_sync == "all_reduce":', "if True:"),
    ("hpsv2: fp16 autocast ignored", "losses.py", "        if self.fp16:  # each cosine", "        if False:  # each cosine"),
    ("t5: captions cleaned once", "model_ar.py", "    for _ in range(2):\n        text = urllib", "    for _ in range(1):\n        text = urllib"),
    ("t5: captions only lower-cased", "model_ar.py", "b = tokenizer([clean_caption(p) for p in prompts]", "b = tokenizer([p.lower().strip() for p in prompts]"),
    ("decoder: per_rank trains on any rank's groups", "train_decoder.py", "(owner == r).nonzero()", "(owner >= 0).nonzero()"),
    ("decoder: per_rank chunks not dealt by rank", "train_decoder.py",
     "torch.stack([p[i].view(-1, c.decoder_batch) for p in parts], 1).flatten()", "torch.cat([p[i] for p in parts])"),
    ("decoder: the release's extra EMA updates skipped", "train_decoder.py", "for _ in range(c.ema_updates - 1):", "for _ in range(0):"),
    ("decoder: real images of the prompts drawn at random", "train_decoder.py", 'if c.real_images == "prompts":\n            real_idx = []', "if False:\n            real_idx = []"),
    ("decoder: L_cons is LPIPS whenever it is loaded", "train_decoder.py",
     'cons_loss(images, ema_images, None if c.cons_kind == "mse" else', "cons_loss(images, ema_images, None if False else"),
    ("sft: targets shifted twice", "train_sft.py", "loss = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())",
     "loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), codes[:, 1:].flatten())"),
    ("t5: right_zeroed keeps the last pad", "model_ar.py", 'if padding == "right":\n                emb[i, max_length - len(pad):] = pad', "if True:\n                emb[i, max_length - len(pad):] = pad"),
    ("decoder: cons schedule ignored", "train_decoder.py", 'lambda_cons = c.lambda_cons if c.cons_schedule == "none" else', "lambda_cons = c.lambda_cons if True else"),
    ("loop: EMA hand-over ignored", "ranke.py", 'save_decoder(decoder.vq if c.reward_decoder == "decoder" else decoder.ema, decoder_file)', "save_decoder(decoder.vq, decoder_file)"),
    ("loop: decoder hand-over skipped", "ranke.py", "train_policy.set_decoder(policy, decoder_file)", "pass"),
    ("loop: a held out_dir not refused", "run_folder.py", "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass"),
    ("loop: a resumed log keeps a killed run's rounds", "run_folder.py", "if (r := log_round(x)) is not None and r <= start]", "]"),
    ("loop: a damaged round resumed", "common.py", "if name in files and file_digest(path) != files[name]:", "if False:"),
    ("loop: a stage alone starts from a damaged round", "common.py", "bad = verify_round(init_from)", 'bad = ""'),
    ("loop: the last round's sums taken by name", "common.py", "if os.path.exists(p) and os.path.samefile(p, path)), None)",
     "if os.path.basename(p) == name), None)"),
    ("loop: safetensors' failed write not caught", "run_folder.py", "except (OSError, SafetensorError) as e:", "except OSError as e:"),
    ("files: lines split at every Unicode break", "common.py", 'for line in text.split("\\n") if line.strip()]', "for line in text.splitlines() if line.strip()]"),
    ("decoder: L_cons's LPIPS under autocast with score_fp32", "train_decoder.py", "in_fp32(s.lpips) if c.score_fp32 else s.lpips", "s.lpips"),
    ("loop: a partial round resumed", "run_folder.py", "needed_files(c.mode, start))", "())"),
    ("loop: a failed save leaves its .tmp", "run_folder.py", "        shutil.rmtree(tmp, ignore_errors=True)\n        size = ", "        size = "),
    ("loop: the loss scaler not saved", "common.py", 'meta = {"scaler": json.dumps(scaler.state_dict())} if scaler', "meta = None if scaler"),
    ("loop: an exploded decoder kept", "train_decoder.py", '    check_weights(decoder_parameters(s.vq), "decoder", start_weight)\n', ""),
    ("files: not UTF-8 read as Latin-1", "common.py", 'return data.decode("utf-8")', 'return data.decode("latin-1")'),
    ("files: a corrupt .pt left unnamed", "checkpoint.py", "except (RuntimeError, EOFError) as e:", "except EOFError as e:"),
    ("reward: score_fp32 ignored", "losses.py", "return in_fp32(score)(images) if self.fp32 else score(images)", "return score(images)"),
    ("reward: score_fp32 not passed", "losses.py", "for n in names], c.score_fp32)", "for n in names])"),
    ("t5: t5_dtype ignored", "common.py", "c.t5_path, c.device, getattr(torch, c.t5_dtype), max_length,", "c.t5_path, c.device, torch.float32, max_length,"),
    ("loop: a run from before a setting existed refused", "run_folder.py", "common.saved_setting(old, k, stages)", "old.get(k)"),
    ("reward: hps_input ignored", "losses.py", 'resize="pil" if c.hps_input == "pil" else c.reward_resize', "resize=c.reward_resize"),
    ("reward: PIL input rounded, not truncated", "losses.py", "for img in x.cpu()]).to(self.device)", "for img in (x.cpu() * 255).round() / 255]).to(self.device)"),
    ("loop: a resume's settings compared without JSON's lists", "run_folder.py", "old[k] != json.loads(json.dumps(v))]", "old[k] != v]"),
    ("rng: chunk ignored in seeds", "common.py", "return torch.Generator().manual_seed(int(hashlib.sha1(repr(ints).encode())",
     "return torch.Generator().manual_seed(int(hashlib.sha1(repr(ints[:3]).encode())"),
    ("sft: captions never dropped", "train_sft.py", "uncond = torch.rand(c.sft_batch, generator=g) < c.sft_uncond",
     "uncond = torch.rand(c.sft_batch, generator=g) < 0"),
    # evaluation
    ("frechet: only right for commuting covariances", "eval.py", "tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1)",
     "tr_sqrt = torch.linalg.eigvalsh(s1).clamp(min=0).sqrt() * torch.linalg.eigvalsh(s2)"),
    ("geneval: thresholds swapped", "geneval.py", '0.9 if spec["tag"] == "counting" else 0.3', '0.3 if spec["tag"] == "counting" else 0.9'),
    ("geneval: colour of the background", "geneval.py", "Image.composite(image, grey, Image.fromarray(mask.numpy()))",
     "Image.composite(grey, image, Image.fromarray(mask.numpy()))"),
    ("fid: covariance without Bessel's correction", "eval.py", "return f.mean(0), torch.cov(f.t())", "return f.mean(0), torch.cov(f.t(), correction=0)"),
    ("rope: rows and columns swapped", "model_ar.py", "f = torch.cat([f[:, None].expand(-1, grid, -1), f[None].expand(grid, -1, -1)], -1)",
     "f = torch.cat([f[None].expand(grid, -1, -1), f[:, None].expand(-1, grid, -1)], -1)"),
    ("geneval: no position margin", "geneval.py", "def relative_position(box_a, box_b, margin=0.1):", "def relative_position(box_a, box_b, margin=0.0):"),
    ("geneval: exclusions ignored", "geneval.py", "len(objects.get(req[\"class\"], [])) >= req[\"count\"] for req in spec.get(\"exclude\", [])",
     "False for req in spec.get(\"exclude\", [])"),
    ("geneval: one colour is enough", "geneval.py", ".count(req[\"color\"]) >= req[\"count\"]", ".count(req[\"color\"]) >= 1"),
    ("geneval: mask score dropped", "geneval.py", "scores = scores * (logits.sigmoid() * masks)", "scores = scores + 0 * (logits.sigmoid() * masks)"),
    ("geneval: mean over images, not tags", "geneval.py", "return {\"GenEval\": sum(m.values()) / len(m), **m}",
     "return {\"GenEval\": sum(correct) / len(correct), **m}"),
    ("fid: quantised resize", "eval.py", 'make_resizer("PIL", False, "bicubic", (size, size))', 'make_resizer("PIL", True, "bicubic", (size, size))'),
    ("hps: pooled is the styles' mean", "eval.py", 'm["HPSv2_pooled"] = torch.cat(pooled).mean().item()',
     'm["HPSv2_pooled"] = m["HPSv2_styles_mean"]'),
    ("study: the standard deviation for the standard error", "study.py", "/ (len(xs) - 1) / len(xs))", "/ (len(xs) - 1))"),
    ("code KL: reversed", "eval.py", "return (p * (p / q).log2()).sum().item()", "return (q * (q / p).log2()).sum().item()"),
    ("entropy: nats", "eval.py", "return -(p[p > 0] * p[p > 0].log2()).sum().item()", "return -(p[p > 0] * p[p > 0].log()).sum().item()"),
    ("world reader: a square's radius is its half-side", "data/shapes/world.py", '"square": (h + w) / 4 / 0.85', '"square": (h + w) / 4'),
    ("world reader: a triangle's centre at its box's", "data/shapes/world.py", 'cy = ys.min() + r if shape == "triangle" else',
     'cy = ys.min() + h / 2 if shape == "triangle" else'),
]

TESTS = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", "test_ranke.py"]


def run_tests(root, timeout):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        return subprocess.run(TESTS, cwd=root, env=env, capture_output=True, text=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def main(words):
    here = os.path.dirname(os.path.abspath(__file__))
    chosen = [m for m in MUTANTS if not words or any(w.lower() in m[0].lower() for w in words)]
    root = os.path.join(tempfile.mkdtemp(prefix="mutate_"), "repo")
    shutil.copytree(here, root, ignore=shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".ci"))
    t0 = time.time()
    if run_tests(root, 1800) != 0:
        raise SystemExit("the fast tests fail on the unmutated code: fix them first")
    base = time.time() - t0
    print(f"unmutated: the fast tests pass in {base:.0f} s; {len(chosen)} mutants")
    survived, stale = [], []
    for name, file, old, new in chosen:
        path = os.path.join(root, file)
        src = open(path).read()
        if src.count(old) != 1:
            stale.append(name)
            print(f"  stale     {name}: its text is in {file} {src.count(old)} times")
            continue
        with open(path, "w") as f:
            f.write(src.replace(old, new))
        t = time.time()
        rc = run_tests(root, 3 * base + 60)
        with open(path, "w") as f:
            f.write(src)
        verdict = "killed" if rc not in (0, "timeout") else ("survived" if rc == 0 else "timeout")
        if rc == 0:
            survived.append(name)
        print(f"  {verdict:9s} {name} ({time.time() - t:.0f} s)", flush=True)
    shutil.rmtree(os.path.dirname(root), ignore_errors=True)
    n = len(chosen) - len(stale)
    print(f"\n{n - len(survived)} of {n} mutants killed" + (f"; survived: {', '.join(survived)}" if survived else "")
          + (f"; stale: {', '.join(stale)}" if stale else ""))
    return len(survived) + len(stale)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
