"""LlamaGen's text-to-image GPT (the RankE policy), a static-KV-cache CFG sampler, per-token log-probs,
and the FLAN-T5 caption encoder.

Module names and shapes are those of the official t2i checkpoints (`t2i_XL_stage1_256.pt`), and the
conditioning is LlamaGen's exactly: 120 caption slots, left-padded with zeros (right padding, the authors'
release's layout, is an option), the caption padding hidden from every query but each position always
sees itself, and for CFG a second batch half with the learned null caption under the same mask. Two
quirks of the official model are kept on purpose, since the checkpoints were trained with them: the 2-D
rotary table is zero for the caption slots (so their queries and keys are zero), and the first image
token is predicted from the last caption slot.
"""
import functools
import hashlib
import html
import math
import os
import re
import unicodedata
import urllib.parse
from html.parser import HTMLParser
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from checkpoint import atomic_save, load_exact, read_state_dict


@dataclass
class GPTConfig:
    n_layer: int = 36
    n_head: int = 20
    dim: int = 1280
    vocab_size: int = 16384
    caption_dim: int = 2048  # FLAN-T5-XL
    cls_token_num: int = 120  # caption slots
    block_size: int = 256  # image tokens: 16 x 16 at 256 px, 32 x 32 for the 512 px stage-2 model
    multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    # LlamaGen pre-trains with 0.1; off here, since every log-prob RL takes must be deterministic
    token_dropout: float = 0.0
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0


GPT_CONFIGS = {
    "GPT-B": GPTConfig(n_layer=12, n_head=12, dim=768),
    "GPT-L": GPTConfig(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": GPTConfig(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": GPTConfig(n_layer=48, n_head=24, dim=1536),
    "GPT-1B": GPTConfig(n_layer=22, n_head=32, dim=2048),
    "GPT-3B": GPTConfig(n_layer=24, n_head=32, dim=3200),
    # small configs for the tests and the micro world
    "GPT-tiny": GPTConfig(n_layer=2, n_head=2, dim=64, vocab_size=64, caption_dim=32, cls_token_num=8,
                          block_size=16, multiple_of=32),
    "GPT-micro": GPTConfig(n_layer=4, n_head=4, dim=128, vocab_size=512, caption_dim=64, cls_token_num=16,
                           block_size=256, multiple_of=32),
}


def gpt_config(config="GPT-XL", **overrides):
    return replace(GPT_CONFIGS[config] if isinstance(config, str) else config, **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    def __init__(self, batch, n_head, length, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_head, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


def apply_rope(x, rope):
    """x: B x L x H x D; rope: L x D/2 x 2 (cos, sin). Rotates pairs (x[2i], x[2i+1]) in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    out = torch.stack([xf[..., 0] * cos - xf[..., 1] * sin, xf[..., 1] * cos + xf[..., 0] * sin], -1)
    return out.flatten(3).type_as(x)


def rope_2d(grid, head_dim, base, n_caption):
    """LlamaGen's 2-D RoPE table: half the pairs rotate with the row, half with the column; zeros for
    the caption slots (the official table, which the checkpoints were trained with)."""
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    f = torch.outer(torch.arange(grid).float(), freqs)  # grid x head_dim/4
    f = torch.cat([f[:, None].expand(-1, grid, -1), f[None].expand(grid, -1, -1)], -1).flatten(0, 1)
    table = torch.stack([f.cos(), f.sin()], -1)
    return torch.cat([torch.zeros(n_caption, head_dim // 2, 2), table])


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.dim // cfg.n_head
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)
        self.kv_cache = None

    def forward(self, x, rope, mask, input_pos=None):
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).view(B, L, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if input_pos is not None:  # cached decoding; the teacher-forced forward never touches the cache
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, L, -1)))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * 4 * cfg.dim / 3)
        hidden = cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)  # SwiGLU width, as LLaMA
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention, self.feed_forward = Attention(cfg), FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, input_pos=None):
        x = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class CaptionEmbedder(nn.Module):
    """T5 features -> model width by a 2-layer MLP; holds the learned null caption used for CFG.
    `uncond_embedding` is a buffer in the official model, so it never trains (in RankE neither)."""
    def __init__(self, cfg):
        super().__init__()
        self.cap_proj = nn.Module()
        self.cap_proj.fc1 = nn.Linear(cfg.caption_dim, cfg.dim, bias=False)
        self.cap_proj.fc2 = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.register_buffer("uncond_embedding", torch.randn(cfg.cls_token_num, cfg.caption_dim) / cfg.caption_dim ** 0.5)

    def forward(self, cond):
        return self.cap_proj.fc2(F.gelu(self.cap_proj.fc1(cond), approximate="tanh"))


def attention_mask(cond_mask, length):
    """B x 1 x L x L bool: causal, caption padding hidden from every query, the diagonal always kept --
    the mask of LlamaGen's t2i training data and of its sampler."""
    B, C = cond_mask.shape
    keep = torch.ones(B, length, dtype=torch.bool, device=cond_mask.device)
    keep[:, :C] = cond_mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device=cond_mask.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=cond_mask.device)
    return ((causal & keep[:, None, :]) | eye)[:, None]


def run_layers(layers, h, rope, mask, recompute=False):
    """The teacher-forced blocks in order. With `recompute` (activation checkpointing, while autograd
    records) a block keeps only its input for the backward and runs again there: one more forward of
    compute for the memory of one block's activations instead of all of them."""
    for layer in layers:
        if recompute and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, use_reentrant=False)
        else:
            h = layer(h, rope, mask)
    return h


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.cls_embedding = CaptionEmbedder(cfg)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        grid = int(cfg.block_size ** 0.5)
        assert grid * grid == cfg.block_size, "block_size must be a square grid of tokens"
        self.register_buffer("rope", rope_2d(grid, cfg.dim // cfg.n_head, cfg.rope_base, cfg.cls_token_num), persistent=False)
        for m in self.modules():  # LlamaGen's init (used when the micro world trains from scratch)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)
        self.grad_checkpoint = False  # activation checkpointing of the teacher-forced forward (train_policy's switch)

    # -- what generate() and token_logprobs() ask of a policy (model_janus.JanusPolicy answers the same) --
    def embed_caption(self, cond):
        """Caption features -> the residual stream, in the token embeddings' dtype (fp32 under autocast)."""
        w = self.cls_embedding.cap_proj.fc1.weight
        return self.cls_embedding(cond.to(w.dtype)).to(self.tok_embeddings.weight.dtype)

    def embed_tokens(self, tokens):
        return self.tok_embeddings(tokens)

    def null_caption(self, cond, cond_mask):
        """The unconditional caption of CFG: the learned null caption under the same mask."""
        return self.cls_embedding.uncond_embedding.to(cond.dtype).expand_as(cond), cond_mask

    def caption(self, cond, uncond=None):
        """Rows where `uncond` is True take the learned null caption (caption dropout / CFG)."""
        if uncond is None:
            return cond
        null = self.cls_embedding.uncond_embedding.to(cond.dtype)
        return torch.where(uncond[:, None, None], null, cond)

    def forward(self, tokens, cond, cond_mask, uncond=None):
        """Teacher-forced logits B x T x V (fp32): logits[:, t] predicts tokens[:, t] from the caption
        and tokens[:, :t]. cond: B x C x caption_dim left-padded; cond_mask: B x C (1 = caption)."""
        C = self.config.cls_token_num
        tok = self.tok_embeddings(tokens[:, :-1])
        h = torch.cat([self.embed_caption(self.caption(cond, uncond)), tok], 1)
        L = h.shape[1]
        mask, rope = attention_mask(cond_mask, L), self.rope[:L]
        h = self.tok_dropout(h)
        h = run_layers(self.layers, h, rope, mask, self.grad_checkpoint)
        return self.output(self.norm(h[:, C - 1:])).float()

    # -- static KV cache (gpt-fast) --
    def setup_cache(self, batch, dtype):
        cfg = self.config
        length = cfg.cls_token_num + cfg.block_size
        c = self.layers[0].attention.kv_cache
        if c is not None and c.k.shape[0] == batch and c.k.dtype == dtype:
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, cfg.n_head, length, cfg.dim // cfg.n_head, dtype, self.output.weight.device)

    def free_cache(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def step(self, h, input_pos, mask):
        """Run new positions `input_pos` through the cached model; logits of the last one, B x V."""
        rope = self.rope[input_pos]
        for layer in self.layers:
            h = layer(h, rope, mask, input_pos)
        return self.output(self.norm(h[:, -1])).float()


def prefill(model, cond, mask, input_pos):
    return model.step(model.embed_caption(cond), input_pos, mask[:, :, input_pos])


def decode_one_token(model, token, mask, input_pos):
    return model.step(model.embed_tokens(token), input_pos, mask[:, :, input_pos])


def guide(logits, cfg_scale):
    """Classifier-free guidance on a batch whose second half is unconditional (LlamaGen: only if s > 1)."""
    if cfg_scale <= 1.0:
        return logits
    c, u = logits.chunk(2)
    return u + cfg_scale * (c - u)


@torch.no_grad()
def filter_keep(z, top_k, top_p):
    """Bool mask of the tokens LlamaGen's top-k then top-p filter keeps (ties at the k-th value are
    kept; the top-p set is the smallest prefix whose mass reaches top_p). z: ... x V."""
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k > 0:
        keep = z >= z.topk(min(top_k, z.shape[-1]), dim=-1).values[..., -1:]
    if top_p < 1.0:
        s, idx = z.masked_fill(~keep, float("-inf")).sort(-1, descending=True)
        drop = s.softmax(-1).cumsum(-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses the threshold
        drop[..., 0] = False
        keep = keep & ~drop.scatter(-1, idx, drop)
    return keep


def sample(logits, temperature, top_k, top_p, generator=None):
    """One token per row from B x V logits, and its log-prob under the distribution that drew it.
    temperature 0 is greedy (log-prob 0: a point mass). `generator` may be a list: one stream for each
    equal share of the rows, so that a batch of rollout chunks draws what each chunk alone would."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True), logits.new_zeros(logits.shape[0])
    z = logits / temperature
    z = z.masked_fill(~filter_keep(z, top_k, top_p), float("-inf"))
    logp = z.log_softmax(-1)
    if isinstance(generator, (list, tuple)):
        parts = logp.exp().split(len(logp) // len(generator))
        token = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(parts, generator, strict=True)])
    else:
        token = torch.multinomial(logp.exp(), 1, generator=generator)
    return token, logp.gather(-1, token)[:, 0]


def cfg_batch(model, cond, cond_mask, cfg_scale):
    """Append the unconditional half (the model's null caption) when s > 1."""
    if cfg_scale <= 1.0:
        return cond, cond_mask
    null, null_mask = model.null_caption(cond, cond_mask)
    return torch.cat([cond, null]), torch.cat([cond_mask, null_mask])


def activation_dtype(model):
    """The dtype of the model's activations: the autocast dtype while autocast is on for the model's
    device, else the weights' dtype."""
    w = next(model.parameters())
    return torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype


@torch.no_grad()
def generate(model, cond, cond_mask, cfg_scale=7.5, temperature=1.0, top_k=1000, top_p=1.0,
             generator=None, return_logprobs=False, decode_fn=decode_one_token):
    """Sample B x block_size image tokens with CFG from a static KV cache: prefill the caption, then
    one token at a time. With return_logprobs, also the B x T log-probs of the sampled tokens under the
    distribution that sampled them (GRPO's pi_old). `decode_fn` may be a torch.compile'd
    decode_one_token."""
    cfg = model.config
    C, T = cfg.cls_token_num, cfg.block_size
    cond, cond_mask = cfg_batch(model, cond, cond_mask, cfg_scale)
    dtype = activation_dtype(model)
    model.setup_cache(cond.shape[0], dtype)  # k, v as the attention computes them: bf16 under bf16 autocast
    mask = attention_mask(cond_mask, C + T)
    logits = prefill(model, cond, mask, torch.arange(C, device=cond.device))
    tokens, logps = [], []
    for t in range(T):
        token, logp = sample(guide(logits, cfg_scale), temperature, top_k, top_p, generator)
        tokens.append(token)
        logps.append(logp)
        if t < T - 1:
            pos = torch.tensor([C + t], device=cond.device)
            logits = decode_fn(model, torch.cat([token, token]) if cfg_scale > 1.0 else token, mask, pos)
    tokens = torch.cat(tokens, 1)
    return (tokens, torch.stack(logps, 1)) if return_logprobs else tokens


def token_logprobs(model, tokens, cond, cond_mask, cfg_scale=7.5, temperature=1.0, top_k=0, top_p=1.0,
                   cond_only=False):
    """Teacher-forced, differentiable log-prob of each token B x T, and the entropy of the distribution
    it was drawn from (detached), in one batched forward.

    By default the distribution is the sampler's: log_softmax((u + s (c - u)) / temperature) over the
    top-k / top-p set, which is chosen on the current logits and always holds the given token (so no
    -inf). The gradient reaches the unconditional branch with weight (1 - s). cond_only=True gives the
    conditional logits' full softmax, without guidance, temperature or filtering: the log-prob of
    published GRPO baselines (AR-GRPO, T2I-R1) and of the authors' release."""
    if cond_only:
        logits = model(tokens, cond, cond_mask)
        logp_all = logits.log_softmax(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, tokens[..., None])[..., 0], entropy
    if temperature <= 0:
        raise ValueError("token_logprobs needs temperature > 0 (greedy decoding has no log-prob to train)")
    cond2, mask2 = cfg_batch(model, cond, cond_mask, cfg_scale)
    logits = model(torch.cat([tokens, tokens]) if cfg_scale > 1.0 else tokens, cond2, mask2)
    z = guide(logits, cfg_scale) / temperature
    keep = filter_keep(z.detach(), top_k, top_p)
    keep.scatter_(-1, tokens[..., None], True)
    z = z.masked_fill(~keep, float("-inf"))
    logp_all = z.log_softmax(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all.masked_fill(~keep, 0)).sum(-1)
    return logp_all.gather(-1, tokens[..., None])[..., 0], entropy


def load_gpt(path, config="GPT-XL", **overrides):
    """An official LlamaGen t2i checkpoint (.pt with tensors under "model", "module" or "state_dict")
    or a .safetensors. overrides: e.g. block_size=1024 for t2i_XL_stage2_512.pt."""
    cfg = gpt_config(config, **overrides)
    sd = read_state_dict(path)
    if "cls_embedding.embedding_table.weight" in sd:
        raise ValueError(f"{path} is a class-conditional LlamaGen checkpoint; RankE needs a text-to-image (t2i) one")
    name = config if isinstance(config, str) else "the given GPTConfig"
    return load_exact(GPT(cfg), sd, f"GPT config {name}{' ' + str(overrides) if overrides else ''} ({path})").eval()


# -- the caption encoder (FLAN-T5-XL for LlamaGen) --

# LlamaGen's T5Embedder (from PixArt / DeepFloyd IF) cleans every caption twice before T5, in training and in
# sampling, so its checkpoints read cleaned text: the rules below in its order. Its ftfy and BeautifulSoup
# steps are done with the standard library (ftfy's mojibake repair is left out); the test checks the whole
# on COCO-30K, PartiPrompts and GenEval against the original run outside this project.
_CJK = "\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff"
_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
_URL = r"[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
_EXT = "(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_BEFORE_HTML = [(r"<person>", "person"), (r"\b((?:https?:(?:\/{1,3}|" + _URL, ""),
                (r"\b((?:www:(?:\/{1,3}|" + _URL, "")]
_BEFORE_FTFY = [(r"@[\w\d]+\b", ""), (f"[{_CJK}]+", ""), (f"[{_DASHES}]+", "-"),
                ("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]", '"'), ("[\u2018\u2019]", "'"),
                (r"&quot;?", ""), (r"&amp", ""), (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # entities, IPs
                (r"\d:\d\d\s+$", ""), (r"\\n", " "), (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
                (r"[\S]+\." + _EXT, ""), (r"[\"\']{2,}", '"'), (r"[\.]{2,}", " "),  # file names, runs of quotes, dots
                (r"[#\u00ae\u2022\u00a9\u2122&@\u00b7\u00ba\u00bd\u00be\u00bf\u00a1\u00a7~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),
                (r"\s+\.\s+", " ")]
_AFTER_FTFY = [(r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),
               (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
               (r"\bclick\b\s(?:for|on)\s\w+", ""), (r"\b" + _EXT + r"(\simage[s]?)?", ""), (r"\bpage\s+\d+\b", ""),
               (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "), (r"\b\d+\.?\d*[x\u0445\u00d7]\d+\.?\d*\b", ""),
               (r"\b\s+\:\s+", ": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
               (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", ""), (r"[\'\_,\-\:\-\+]$", ""), (r"^\.\S+$", "")]


def _html_text(text):
    """The text of `text` read as HTML (tags dropped, entities decoded), as BeautifulSoup's html.parser gives it."""
    parts = []
    parser = HTMLParser(convert_charrefs=True)
    parser.handle_data = parts.append
    parser.feed(text)
    parser.close()
    return "".join(parts)


def _fix_text(text):
    """ftfy.fix_text's fixes of well-encoded text: line breaks, control characters, curly quotes, Latin
    ligatures and full-width letters, NFC."""
    text = re.sub("\r\n|[\r\u2028\u2029\x85]", "\n", text)
    text = re.sub("[\x00-\x08\x0b\x0e-\x1f\x7f]", "", text)
    text = re.sub("[\u02bc\u2018-\u201b]", "'", re.sub("[\u201c-\u201f]", '"', text))
    text = re.sub("[\ufb00-\ufb06\uff01-\uff5e]", lambda m: unicodedata.normalize("NFKC", m.group()), text)
    return unicodedata.normalize("NFC", text)


@functools.lru_cache(maxsize=1 << 16)  # the feature cache's keys ask for it twice a prompt at every step
def clean_caption(caption):
    """A caption as LlamaGen's T5 reads it: cleaned twice (URLs, HTML, handles, CJK, ids, file names, stray
    punctuation; lower case, single spaces)."""
    for _ in range(2):
        text = urllib.parse.unquote_plus(str(caption)).strip().lower()
        for pattern, repl in _BEFORE_HTML:
            text = re.sub(pattern, repl, text)
        text = _html_text(text)
        for pattern, repl in _BEFORE_FTFY:
            text = re.sub(pattern, repl, text)
        if len(re.findall(r"[-_]", text)) > 3:  # this-is-a-slug / this_is_a_slug
            text = re.sub(r"[-_]", " ", text)
        text = html.unescape(html.unescape(_fix_text(text))).strip()
        for pattern, repl in _AFTER_FTFY:
            text = re.sub(pattern, repl, text)
        caption = text.strip()
    return caption

def load_t5(path, device="cpu", dtype=torch.float32):
    """T5EncoderModel and its tokenizer from a local directory (no download)."""
    from transformers import AutoTokenizer, T5EncoderModel
    if not os.path.isdir(path):
        raise FileNotFoundError(f"T5 directory not found: {path} (a local copy of google/flan-t5-xl, "
                                f"with config.json, the weights and the tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    return tokenizer, encoder.to(device).eval()


@torch.no_grad()
def t5_embed(prompts, tokenizer, encoder, max_length=120, padding="left"):
    """Caption features B x max_length x D and their mask B x max_length. padding="left" is LlamaGen's
    layout: valid tokens moved to the end, zeros before them. "right" is the tokenizer's own layout,
    as the authors' release trains on it: valid tokens first, then T5's outputs at the padding;
    "right_zeroed" as its COCO and HPSv2 samplers feed it: every padding slot zero, the last one too
    (the first image token is predicted from it). Captions are cleaned first, as LlamaGen's (clean_caption)."""
    b = tokenizer([clean_caption(p) for p in prompts], max_length=max_length, padding="max_length",
                  truncation=True, return_tensors="pt").to(encoder.device)
    emb = encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    if padding == "right":
        return emb, b.attention_mask
    if padding == "right_zeroed":
        return emb * b.attention_mask[..., None], b.attention_mask
    n = b.attention_mask.sum(1, keepdim=True)  # valid tokens per prompt, right-padded by the tokenizer
    rolled = (torch.arange(max_length, device=emb.device) + n) % max_length  # row j <- token (j + n) % L
    emb = emb.gather(1, rolled[..., None].expand_as(emb))
    mask = b.attention_mask.flip(-1)
    return emb * mask[..., None], mask


def prompt_key(prompt):
    """The cache's key of a prompt: that of the text T5 reads (prompts cleaning to the same text share it)."""
    return hashlib.sha1(clean_caption(prompt).encode()).hexdigest()


def fill_t5_cache(prompts, cache_file, t5_path=None, device="cpu", dtype=torch.float32, max_length=120,
                  batch_size=64):
    """Add the T5 features of the prompts missing from a safetensors cache keyed by prompt: the valid
    rows, and under key + "/pad" the output at the last slot when it is padding (right padding feeds it
    to the policy: the first image token is predicted from that slot). T5 loads only if some are missing."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    have = set()
    if os.path.isfile(cache_file):
        with safe_open(cache_file, "pt") as f:
            have = set(f.keys())
    todo = sorted({p for p in prompts if prompt_key(p) not in have or prompt_key(p) + "/pad" not in have})
    if not todo:
        return
    if t5_path is None:
        raise FileNotFoundError(f"{len(todo)} prompts are not in {cache_file} and no t5_path was given")
    tokenizer, encoder = load_t5(t5_path, device, dtype)
    cache = load_file(cache_file) if have else {}
    for i in range(0, len(todo), batch_size):
        emb, mask = t5_embed(todo[i:i + batch_size], tokenizer, encoder, max_length, padding="right")
        for p, e, m in zip(todo[i:i + batch_size], emb, mask):
            cache[prompt_key(p)] = e[m.bool()].cpu()
            cache[prompt_key(p) + "/pad"] = e[-1:].cpu() if m[-1] == 0 else e[:0].cpu()
    atomic_save(cache, cache_file)


def cached_t5_embed(prompts, cache_file, t5_path=None, device="cpu", dtype=torch.float32, max_length=120,
                    padding="left"):
    """t5_embed through the cache (filled first if needed); reads only these prompts' rows. Right
    padding has zeros where t5_embed has T5's padding outputs, but for the last slot (right_zeroed: there
    too): the others are hidden
    from every other query and predict no token. Returns (B x max_length x D, B x max_length) on the CPU."""
    from safetensors import safe_open
    fill_t5_cache(prompts, cache_file, t5_path, device, dtype, max_length)
    with safe_open(cache_file, "pt") as f:
        feats = [(f.get_tensor(prompt_key(p)), f.get_tensor(prompt_key(p) + "/pad")) for p in prompts]
    emb = torch.zeros(len(prompts), max_length, feats[0][0].shape[-1], dtype=feats[0][0].dtype)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
    for i, (f, pad) in enumerate(feats):
        if padding in ("right", "right_zeroed"):
            emb[i, :len(f)], mask[i, :len(f)] = f, 1
            if padding == "right":
                emb[i, max_length - len(pad):] = pad
        elif len(f):
            emb[i, -len(f):], mask[i, -len(f):] = f, 1
    return emb, mask
