"""RankE's objectives, one function per equation, and its reward models.

  Eq. 3  L_GRPO  = -mean_{i,t} min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta KL_t(pi_theta || pi_ref)
  Eq. 4  L_dec   = lambda_bp L_BP + lambda_gan L_RankGAN + lambda_rec L_rec + lambda_cons L_cons
  Eq. 5  L_BP    = -mean_i R(D_phi(sg(z_i)), c_i)                           (differentiable R only)
  Eq. 6  L_RankGAN = mean_i w_i g(Disc(D_phi(z_i))),  w = N softmax(r / tau) (any R)
  Eq. 7  L_rec   = |D_phi(q(E(x))) - x|_1 (+ LPIPS)                         (ground-truth codes)
  Eq. 8  L_cons  = |D_phi(z_i) - D_ema(z_i)|_2^2                            (policy codes)

Nothing here differentiates through sampling or quantisation: policy codes arrive as integers.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------- Stage 1: token-level ranking


def group_advantages(rewards, group_size, eps=1e-4):
    """Eq. 3's A_i = (r_i - mean_j r_j) / (std_j r_j + eps) within each prompt's group of G rollouts
    (rollouts of a group are contiguous). A group whose rewards are all equal gets exactly zero
    advantages (it carries no ranking); returns (advantages, fraction of such groups)."""
    r = rewards.float().view(-1, group_size)
    flat = r.max(1).values == r.min(1).values
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)  # unbiased std, as TRL's GRPO
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)
    return adv.view(-1), flat.float().mean().item()


def grpo_loss(logp, logp_old, logp_ref, advantages, clip_eps=0.2, beta=0.05, n_tokens=None, entropy=None, kl="k3"):
    """Eq. 3, token level. logp (differentiable), logp_old (pi_old at sampling time), logp_ref: B x T;
    advantages: B. The sum over tokens is divided by `n_tokens`: pass the active tokens of the whole
    global batch divided by the world size, so that neither gradient accumulation nor DDP's gradient
    averaging changes the loss (default: this batch's tokens). The KL estimator, with q = pi_ref and
    p = pi_theta: "k3" = q/p - log(q/p) - 1 (>= 0, unbiased for KL(pi_theta || pi_ref); the paper) or
    "k2" = (log p - log q)^2 / 2 (the authors' release)."""
    ratio = torch.exp(logp - logp_old)
    A = advantages[:, None]
    pg = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
    log_q_p = logp_ref - logp
    kl = torch.exp(log_q_p) - log_q_p - 1 if kl == "k3" else 0.5 * log_q_p ** 2
    n_tokens = logp.numel() if n_tokens is None else n_tokens
    loss = (pg + beta * kl).sum() / n_tokens
    with torch.no_grad():  # a token is clipped when the clipped branch is the one min() kept
        clipped = ((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))
        stats = {"clip_frac": clipped.float().mean().item(), "ratio_dev": (ratio - 1).abs().mean().item(),
                 "ratio_max": ratio.max().item(), "kl": kl.mean().item()}
        if entropy is not None:
            stats["entropy"] = entropy.float().mean().item()
    return loss, stats


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """phi_ema <- decay phi_ema + (1 - decay) phi over the parameters, for pi_ref and the EMA decoder
    alike (decay 1: a frozen copy). Neither has running statistics to follow."""
    if decay >= 1.0:
        return
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.to(e.dtype), 1.0 - decay)


# ---------------------------------------------------------------- Stage 2: pixel-level ranking


def rank_weights(rewards, tau, group_size=None):
    """Eq. 6's w = N softmax(r / tau), detached, mean 1 (so the expected gradient matches a plain
    GAN). tau = inf is uniform (the "w/o ranking" ablation); tau -> 0 is hard best-of-N.

    The paper is silent on the softmax's support. By default (group_size given) it runs within each
    prompt's group of G rollouts, w = G softmax_group(r / tau): the reward-tilted posterior
    pi(z|c) exp(R / tau) that Rank-GAN imitates (Appendix B.4) is normalised per prompt, prompts whose
    rewards are naturally higher (CLIP's scale varies by caption) do not take the whole batch's
    weight, and since a group never straddles ranks the weights do not change with the world size.
    group_size=None gives the batch-wide softmax of a literal reading of Eq. 6."""
    r = rewards.detach().float()
    if tau == float("inf"):
        return torch.ones_like(r)
    r = r.view(-1, group_size) if group_size else r.view(1, -1)
    return (r.shape[1] * torch.softmax(r / tau, dim=1)).view(-1)


def top_k_weights(rewards, group_size, k, temp):
    """The release's decoder-stage selection: the k best rollouts of each prompt's group (rollouts of a
    group are contiguous), weighted k softmax(r / temp) within the group (mean 1). Returns the indices of
    the selected rollouts, best first in each group, and their weights (k = 1: the best, weight 1)."""
    r = rewards.detach().float().view(-1, group_size)
    top, order = r.topk(k, dim=1)
    idx = order + torch.arange(len(r))[:, None] * group_size
    return idx.flatten(), (k * torch.softmax(top / temp, dim=1)).flatten()


def schedule(kind, step, start_step, end_step, start_value, end_value):
    """A weight that moves from start_value (until start_step) to end_value (from end_step): 'linear',
    or 'sin' (half a cosine, flat at both ends), as the authors' release schedules L_cons and the
    selection temperature."""
    if step >= end_step:
        return end_value
    if step <= start_step:
        return start_value
    t = (step - start_step) / (end_step - start_step)
    if kind == "sin":
        t = 0.5 * (1 - math.cos(math.pi * t))
    return start_value + (end_value - start_value) * t


def gen_adv_loss(logits_fake, kind="hinge"):
    """g(Disc(x)) per image: hinge -mean(D), or non-saturating mean(softplus(-D)), over the patches."""
    per_patch = -logits_fake if kind == "hinge" else F.softplus(-logits_fake)
    return per_patch.flatten(1).mean(1)


def rank_gan_loss(logits_fake, weights, kind="hinge"):
    """Eq. 6: the generator side of the GAN on policy decodings, weighted per image by rank_weights."""
    return (weights * gen_adv_loss(logits_fake, kind)).mean()


def disc_loss(logits_real, logits_fake):
    """The discriminator's hinge loss against real training images (LlamaGen / taming, with its 1/2),
    and its accuracy (real patches > 0, fake patches < 0)."""
    loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
    return loss, acc.item()


def adaptive_weight(nll_loss, g_loss, last_layer):
    """VQGAN's adaptive GAN weight |grad nll| / (|grad g| + 1e-4) at the decoder's last layer."""
    g_nll = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


def patchgan(in_channels=3, ndf=64, n_layers=3):
    """The N-layer PatchGAN of pix2pix / VQGAN / LlamaGen's tokenizer training (BatchNorm, LeakyReLU
    0.2, 4x4 convs): one logit per overlapping patch. It only ever runs in training mode, so its
    BatchNorm keeps no running statistics (they would differ between ranks and are never used)."""
    layers, c = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], ndf
    for n in range(1, n_layers + 1):
        c_out = ndf * min(2 ** n, 8)
        stride = 2 if n < n_layers else 1
        layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out, track_running_stats=False), nn.LeakyReLU(0.2, True)]
        c = c_out
    layers.append(nn.Conv2d(c, 1, 4, 1, 1))
    d = nn.Sequential(*layers)
    for m in d.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return d


def rec_loss(recon, x, kind="l1", lpips=None, perceptual_weight=1.0):
    """Eq. 7: the tokenizer's own loss on ground-truth codes, L1 ("l1") or L2 ("l2") plus optional LPIPS."""
    loss = F.l1_loss(recon, x) if kind == "l1" else F.mse_loss(recon, x)
    if lpips is not None:
        loss = loss + perceptual_weight * lpips(recon, x).mean()
    return loss


def cons_loss(images, ema_images, lpips=None):
    """Eq. 8: MSE to the EMA decoder's images of the same policy codes (the teacher gets no gradient);
    with an LPIPS module, LPIPS between the two instead (the authors' release)."""
    if lpips is not None:
        return lpips(images, ema_images.detach()).mean()
    return F.mse_loss(images, ema_images.detach())


def bp_loss(reward, images, prompts, weights=None):
    """Eq. 5: minus the differentiable reward of D_phi(sg(z)), weighted per image if given. `images`
    must come from decoding detached policy codes; the reward model is frozen, so gradients reach the
    decoder only."""
    if not reward.differentiable:
        raise ValueError(f"L_BP needs a differentiable reward, and {reward.name} is scored as a black box: "
                         f"set lambda_bp = 0 (Rank-GAN carries its signal to the decoder)")
    r = reward(images, prompts)
    return -(r if weights is None else weights * r).mean()


class LPIPS(nn.Module):
    """LPIPS (VGG16) from local files: torchvision's `vgg16-397923af.pth` and the LPIPS linear heads
    `vgg.pth` of taming / LlamaGen (keys lin{0..4}.model.1.weight). Frozen; images in [-1, 1]."""
    def __init__(self, vgg_path, lin_path):
        super().__init__()
        from torchvision.models import vgg16
        from checkpoint import read_state_dict
        features = vgg16().features
        sd = read_state_dict(vgg_path)
        features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        self.slices = nn.ModuleList(features[a:b] for a, b in [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)])
        lin = read_state_dict(lin_path)
        self.lins = nn.ParameterList(nn.Parameter(lin[f"lin{i}.model.1.weight"]) for i in range(5))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])
        for m in self.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.requires_grad_(False).eval()

    def forward(self, x, y):
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0
        for s, w in zip(self.slices, self.lins):
            h = s(h)
            a, b = (f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in h.chunk(2))
            total = total + F.conv2d((a - b) ** 2, w).mean([2, 3])
        return total.view(-1)


# ---------------------------------------------------------------- rewards


class Reward:
    """R(x, c) with an open_clip model (a name, or the path of an open_clip JSON config): cosine of
    the L2-normalised image and text features (no logit scale). Images come in as B x 3 x H x W
    tensors, are clamped to [-1, 1] (as evaluation sees them) and preprocessed in torch so the score
    stays differentiable: resize="crop" is open_clip's bicubic resize of the short side and centre crop,
    "squash" the authors' release's bilinear resize of the whole image to the model's square. Then the
    model's mean / std. resize="pil" (not differentiable: the release's HPSv2 input) makes uint8 PIL images
    as torchvision's to_pil_image does (x 255, truncated) and runs open_clip's own PIL transform. Text
    features of each prompt are computed once. CLIP score as reported = 100 x this. fp16: the forward and
    the cosine under fp16 autocast, the score left in fp16 (the release's HPSv2)."""

    def __init__(self, name, model_name, weights, device="cpu", differentiable=True, quick_gelu=False, prefix="",
                 resize="crop", fp16=False):
        import open_clip
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{name} reward weights not found: {weights} (give a local open_clip "
                                    f"checkpoint for {model_name}; nothing is downloaded)")
        if resize == "pil" and differentiable:
            raise ValueError(f"the {name} reward cannot be differentiable through PIL images (resize='pil')")
        self.name, self.differentiable, self.prefix, self.resize, self.fp16 = name, differentiable, prefix, resize, fp16
        if model_name.endswith(".json"):  # an architecture of one's own: open_clip's config format
            open_clip.add_model_config(model_name)
            model_name = os.path.basename(model_name)[:-len(".json")]
        self.model = open_clip.create_model(model_name, pretrained=weights, force_quick_gelu=quick_gelu, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(pp["mean"], device=device)[None, :, None, None]
        self.std = torch.tensor(pp["std"], device=device)[None, :, None, None]
        self.device, self.text_cache = device, {}
        self.transform = open_clip.image_transform(self.size, False, pp["mean"], pp["std"]) if resize == "pil" else None

    def preprocess(self, x):
        x = (x.float().clamp(-1, 1) + 1) / 2
        if self.resize == "pil":
            from torchvision.transforms.functional import to_pil_image
            return torch.stack([self.transform(to_pil_image(img)) for img in x.cpu()]).to(self.device)
        H, W = x.shape[-2:]
        if self.resize == "squash" and (H, W) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        elif (H, W) != (self.size, self.size):
            s = self.size / min(H, W)
            x = F.interpolate(x, size=(max(self.size, round(H * s)), max(self.size, round(W * s))),
                              mode="bicubic", align_corners=False, antialias=True)
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def text_features(self, prompts):
        new = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if new:
            f = self.model.encode_text(self.tokenizer([self.prefix + p for p in new]).to(self.device))
            self.text_cache.update(zip(new, F.normalize(f.float(), dim=-1)))
        return torch.stack([self.text_cache[p] for p in prompts])

    def image_features(self, images):
        """L2-normalised image features, B x D (differentiable when the reward is)."""
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    def __call__(self, images, prompts):
        if self.fp16:  # each cosine a 1 x 1 product: autocast runs it in fp16, as the release's logits' diagonal
            with torch.autocast(torch.device(self.device).type, dtype=torch.float16):
                return (self.image_features(images)[:, None] @ self.text_features(prompts)[..., None]).flatten()
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)


class Aesthetic:
    """The LAION aesthetic predictor: an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, its
    dropout off) on the L2-normalised image features of a CLIP ViT-L/14 reward; weights from a local
    `sac+logos+ava1-l14-linearMSE.pth` (keys layers.{0,2,4,6,7}.weight / .bias). Differentiable."""

    def __init__(self, clip, weights):
        from checkpoint import read_state_dict
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"aesthetic head weights not found: {weights} (LAION's "
                                    f"sac+logos+ava1-l14-linearMSE.pth; nothing is downloaded)")
        sd = read_state_dict(weights)
        self.layers = [(sd[f"layers.{i}.weight"].float().to(clip.device), sd[f"layers.{i}.bias"].float().to(clip.device))
                       for i in (0, 2, 4, 6, 7)]
        if self.layers[0][0].shape[1] != clip.model.visual.output_dim:
            raise ValueError(f"the aesthetic head takes {self.layers[0][0].shape[1]}-d CLIP features, and "
                             f"clip_model gives {clip.model.visual.output_dim}: use clip_model=ViT-L-14")
        self.clip, self.name, self.differentiable = clip, "aesthetic", clip.differentiable

    def __call__(self, images, prompts):
        h = self.clip.image_features(images)
        for w, b in self.layers:
            h = F.linear(h, w, b)
        return h[:, 0]


class RewardSum:
    """The run's reward: sum_i scale_i R_i(x, c) over the named rewards (not normalised, as in the
    authors' release). Differentiable only if every term is (L_BP needs all of it)."""

    def __init__(self, terms, fp32=False):
        self.terms = terms  # [(scale, reward)]
        self.name = "+".join(r.name for _, r in terms)
        self.differentiable = all(r.differentiable for _, r in terms)
        self.fp32 = fp32  # scored outside autocast, in fp32 (the release)

    def __call__(self, images, prompts):
        score = lambda x: sum(scale * r(x, prompts) for scale, r in self.terms)
        return in_fp32(score)(images) if self.fp32 else score(images)


def in_fp32(fn):
    """fn run outside autocast on fp32 tensors (the release scores its rewards and L_cons's LPIPS so)."""
    def run(*xs):
        with torch.autocast(next(x for x in xs if torch.is_tensor(x)).device.type, enabled=False):
            return fn(*(x.float() if torch.is_tensor(x) else x for x in xs))
    return run


REWARDS = ("clip", "hpsv2", "aesthetic")


def reward_terms(c):
    """The names in c.reward ('clip', 'clip+aesthetic', ...), or a ValueError naming the choices."""
    names = c.reward.split("+")
    if any(n not in REWARDS for n in names) or len(set(names)) < len(names):
        raise ValueError(f"unknown reward {c.reward!r}: '+'-join distinct terms of {', '.join(REWARDS)}")
    return names


def run_reward(c):
    """The run's reward from its config: `reward` names the terms joined by '+' ('clip' differentiable,
    on clip_model; 'hpsv2' on ViT-H-14, scored without gradients; 'aesthetic' on the clip term's
    features, which must be ViT-L/14), each times its scale (e.g. clip_scale = 100 for 100 cos)."""
    names, clip = reward_terms(c), None
    if "clip" in names or "aesthetic" in names:
        clip = Reward("clip", c.clip_model, c.clip_weights, c.device, True, c.clip_quick_gelu, resize=c.reward_resize)
    terms = {"clip": lambda: clip,
             "hpsv2": lambda: Reward("hpsv2", "ViT-H-14", c.hps_weights, c.device, False,
                                     resize="pil" if c.hps_input == "pil" else c.reward_resize, fp16=c.hps_fp16),
             "aesthetic": lambda: Aesthetic(clip, c.aesthetic_weights)}
    scales = {"clip": c.clip_scale, "hpsv2": c.hps_scale, "aesthetic": c.aesthetic_scale}
    return RewardSum([(scales[n], terms[n]()) for n in names], c.score_fp32)
