"""LlamaGen's VQ image tokenizer (VQ-16 / VQ-8), written out for RankE.

The module names and shapes are those of the official checkpoints (`vq_ds16_t2i.pt`), so they load
with a strict state_dict and encode / decode exactly as FoundationVision/LlamaGen does. Janus-Pro's
image tokenizer is the same VQ-16: a transformers Janus folder loads too, its names translated. RankE's Stage 2
trains the decoder part -- `post_quant_conv` + `decoder` -- on codes from the policy; the encoder,
`quant_conv` and the codebook stay frozen (the codes must keep their meaning for the policy).
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_save, check_keys, load_exact, read_pretrained, read_state_dict


@dataclass
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True  # codes and encoder outputs live on the unit sphere
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # downsampling = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    usage_buffer: int = 65536  # the official files carry quantize.codebook_used (unused at inference)


VQ_CONFIGS = {
    "VQ-16": VQConfig(),
    "VQ-8": VQConfig(ch_mult=(1, 2, 2, 4)),
    # small configs for the tests and the micro world (GroupNorm needs channels divisible by 32)
    "VQ-tiny": VQConfig(codebook_size=64, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32),
    "VQ-micro": VQConfig(codebook_size=512, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=32),
}


def norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions of a feature map."""
    def __init__(self, c):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))  # B, HW, C
        h = F.scaled_dot_product_attention(q, k, v)  # scale C ** -0.5, as the official code
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only, as taming-transformers


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(c_in, c_out, n_blocks, attn, dropout):
    """One resolution level: `res` blocks, an AttnBlock after each on the lowest level."""
    m = nn.Module()
    m.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, dropout) for i in range(n_blocks))
    m.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attn else 0))
    return m


def mid(c, dropout):
    return nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])


def run_level(m, h):
    for i, res in enumerate(m.res):
        h = res(h)
        if len(m.attn):
            h = m.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = cfg.ch
        for i, c_out in enumerate(chs):
            last = i == len(chs) - 1
            self.conv_blocks.append(level(c, c_out, cfg.num_res_blocks, last, cfg.dropout))
            if not last:
                self.conv_blocks[-1].downsample = Downsample(c_out)
            c = c_out
        self.mid = mid(c, cfg.dropout)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for m in self.conv_blocks:
            h = run_level(m, h)
            if hasattr(m, "downsample"):
                h = m.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # lowest resolution first
        c = chs[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = mid(c, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i, c_out in enumerate(chs):
            self.conv_blocks.append(level(c, c_out, cfg.num_res_blocks + 1, i == 0, cfg.dropout))
            if i != len(chs) - 1:
                self.conv_blocks[-1].upsample = Upsample(c_out)
            c = c_out
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for m in self.conv_blocks:
            h = run_level(m, h)
            if hasattr(m, "upsample"):
                h = m.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        self.register_buffer("codebook_used", torch.zeros(cfg.usage_buffer))

    def codebook(self):
        e = self.embedding.weight
        return F.normalize(e, dim=-1) if self.l2_norm else e

    def nearest(self, z):
        """Index of the nearest code for each row of z (N x D), by squared L2 distance."""
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)

    def encode_latent(self, x):
        """Continuous encoder output before quantisation, B x D x h x w (for tokenizer training)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x):
        """Images in [-1, 1], B x 3 x H x W -> codes B x (h*w), raster order."""
        z = self.encode_latent(x)
        B, D, h, w = z.shape
        return self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, h * w)

    def decode(self, codes):
        """Codes B x (h*w) -> images B x 3 x H x W in about [-1, 1]; differentiable in the decoder."""
        B, N = codes.shape
        h = int(N ** 0.5)
        assert h * h == N, f"decode wants a square grid of codes, got {N}"
        q = self.quantize.codebook()[codes].view(B, h, h, -1).permute(0, 3, 1, 2)
        return self.decode_latent(q)

    def decode_latent(self, q):
        return self.decoder(self.post_quant_conv(q))


# Stage 2 trains these; the codebook is saved with them because decode() reads it.
DECODER_PREFIXES = ("post_quant_conv.", "decoder.", "quantize.embedding.")


def decoder_state_dict(vq):
    return {k: v for k, v in vq.state_dict().items() if k.startswith(DECODER_PREFIXES)}


def decoder_parameters(vq):
    return list(vq.post_quant_conv.parameters()) + list(vq.decoder.parameters())


def save_decoder(vq, path):
    atomic_save(decoder_state_dict(vq), path)


def load_decoder(vq, path):
    """Replace the decoder part of `vq` with the one saved in `path` (strict)."""
    sd = read_state_dict(path)
    check_keys(decoder_state_dict(vq), sd, f"the decoder of this VQ config ({path})")
    vq.load_state_dict(sd, strict=False)
    return vq


MID = ("block_1", "attn_1", "block_2")


def from_janus(sd, cfg):
    """transformers' JanusVQVAE names -> LlamaGen's (which DeepSeek's own Janus code keeps): `down` / `up`
    levels with `block`s are `conv_blocks` with `res`, the mid block's `block_1, attn_1, block_2` a list.
    Its usage buffer is not in the file (unused at inference)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(encoder|decoder)\.(?:down|up)\.(\d+)\.block\.", r"\1.conv_blocks.\2.res.", k)
        k = re.sub(r"^(encoder|decoder)\.(?:down|up)\.(\d+)\.", r"\1.conv_blocks.\2.", k)
        k = re.sub(r"\.mid\.(block_1|attn_1|block_2)\.", lambda m: f".mid.{MID.index(m[1])}.", k)
        out[k] = v
    out["quantize.codebook_used"] = torch.zeros(cfg.usage_buffer)
    return out


def to_janus(sd):
    """LlamaGen's names -> transformers' JanusVQVAE names (from_janus backwards), without the usage buffer."""
    out = {}
    for k, v in sd.items():
        if k == "quantize.codebook_used":
            continue
        level = lambda m: f"{m[1]}.{'down' if m[1] == 'encoder' else 'up'}.{m[2]}."
        k = re.sub(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.res\.", lambda m: level(m) + "block.", k)
        k = re.sub(r"^(encoder|decoder)\.conv_blocks\.(\d+)\.", level, k)
        k = re.sub(r"\.mid\.(\d)\.", lambda m: f".mid.{MID[int(m[1])]}.", k)
        out[k] = v
    return out


def load_vq(path, config="VQ-16"):
    """An official LlamaGen tokenizer file (.pt with tensors under "model"), a .safetensors, or a
    transformers Janus folder (its `model.vqmodel`: LlamaGen's VQ-16 under other names)."""
    cfg = VQ_CONFIGS[config] if isinstance(config, str) else config
    vq = VQModel(cfg)
    sd = from_janus(read_pretrained(path, "model.vqmodel."), cfg) if os.path.isdir(path) else read_state_dict(path)
    return load_exact(vq, sd, f"VQ config {config!r} ({path})").eval()
