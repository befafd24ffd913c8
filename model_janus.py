"""Janus-Pro's image generation path, the RankE policy on its second backbone, written for RankE.

Module names and shapes are those of transformers' `JanusForConditionalGeneration` (the converted
`deepseek-community/Janus-Pro-1B` folder, whose tensors sit under `model.`): the Llama language model,
the image-token embedding and its aligner, and the generation head. The understanding tower (SigLIP and
its aligner) and the text head are not part of the policy, since image generation never runs them, so
they neither load nor train. Janus's image tokenizer is LlamaGen's VQ-16, and model_vq.load_vq reads it
from the same folder.

What transformers' `generate(generation_mode="image")` does, and so what this does: the prompt is the
chat template with the image-start token appended, left-padded; CFG's unconditional row replaces every
prompt token but BOS and the image-start token by the pad token, under the same attention mask, and
guides before temperature, top-k and top-p; positions run 0, 1, 2, ... over the padded sequence (RoPE
sees only their differences, so padding changes nothing). The policy answers the calls that
model_ar.generate and model_ar.token_logprobs make of LlamaGen's GPT, so the stages never branch on it.
"""
import json
import os
import shutil
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import atomic_save, load_exact, read_pretrained, read_state_dict
from model_ar import KVCache, RMSNorm, attention_mask, run_layers

FILES = ("config.json", "generation_config.json", "tokenizer_config.json")
TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"  # the converted checkpoint's chat template, no system prompt


@dataclass
class JanusConfig:
    n_layer: int = 24
    n_head: int = 16
    n_kv_head: int = 16
    head_dim: int = 128
    dim: int = 2048
    hidden: int = 5632  # the SwiGLU width
    text_vocab: int = 102400
    vocab_size: int = 16384  # image codes
    code_dim: int = 8  # generation_embeddings: the VQ's code width
    aligner_layers: int = 2
    projection_dim: int = 2048  # generation_aligner and generation_head width
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    block_size: int = 576  # image tokens: 24 x 24 at 384 px
    cls_token_num: int = 128  # prompt slots (set by the run's janus_prompt_len)
    bos_id: int = 100000
    pad_id: int = 100015
    boi_id: int = 100016


def check_folder(path):
    """A transformers Janus folder: its config, generation config, tokenizer and weights, or one error."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Janus checkpoint folder not found: {path} (a local copy of "
                                f"deepseek-community/Janus-Pro-1B, transformers' layout)")
    have = set(os.listdir(path))
    missing = [f for f in FILES if f not in have]
    if not {"model.safetensors", "model.safetensors.index.json"} & have:
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    if not {"tokenizer.json", "tokenizer.model"} & have:
        missing.append("tokenizer.json")
    if missing:
        raise FileNotFoundError(f"{path} is not a complete Janus checkpoint folder: missing {', '.join(missing)}")


def janus_config(path, **overrides):
    """The policy's shape from the folder's config.json and its special tokens from generation_config.json."""
    check_folder(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "generation_config.json")) as f:
        gen = json.load(f)
    text, vq, vision = cfg.get("text_config", {}), cfg.get("vq_config", {}), cfg.get("vision_config", {})
    rope = text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or text.get("hidden_act", "silu") != "silu" \
            or vq.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: only Janus-Pro's default RoPE, SiLU language model and GELU generation head "
                         f"are written here (config says rope {rope}, {text.get('hidden_act')}, {vq.get('hidden_act')})")
    boi = (gen.get("generation_kwargs") or {}).get("boi_token_id")
    if boi is None or gen.get("pad_token_id") is None or gen.get("bos_token_id") is None:
        raise ValueError(f"{path}/generation_config.json must give bos_token_id, pad_token_id and "
                         f"generation_kwargs.boi_token_id (the image-start token), as the converted checkpoint does")
    dim, n_head = text.get("hidden_size", 4096), text.get("num_attention_heads", 32)
    c = JanusConfig(
        n_layer=text.get("num_hidden_layers", 32), n_head=n_head, n_kv_head=text.get("num_key_value_heads") or n_head,
        head_dim=text.get("head_dim") or dim // n_head, dim=dim, hidden=text.get("intermediate_size", 11008),
        text_vocab=text.get("vocab_size", 32000), vocab_size=vq.get("num_embeddings", 16384),
        code_dim=vq.get("embed_dim", 8), aligner_layers=vq.get("num_hidden_layers", 2),
        projection_dim=vq.get("projection_dim", 2048), rope_base=float(rope["rope_theta"]),
        norm_eps=text.get("rms_norm_eps", 1e-6), attention_bias=text.get("attention_bias", False),
        mlp_bias=text.get("mlp_bias", False), block_size=vision.get("num_image_tokens", 576),
        bos_id=gen["bos_token_id"], pad_id=gen["pad_token_id"], boi_id=boi)
    return replace(c, **overrides)


def rope_1d(length, head_dim, base):
    """Llama's rotary table (cos, sin) over positions 0..length-1: frequencies repeated over the two halves."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    f = torch.outer(torch.arange(length).float(), inv_freq)
    f = torch.cat([f, f], -1)
    return torch.stack([f.cos(), f.sin()])


def apply_rope(x, rope):
    """x: B x H x L x D; rope: 2 x L x D. Llama's rotate-half convention."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=cfg.attention_bias)
        self.kv_cache = None

    def forward(self, x, rope, mask, input_pos=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if input_pos is not None:  # cached decoding; the teacher-forced forward never touches the cache
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rope, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class JanusPolicy(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.language_model = nn.Module()
        self.language_model.embed_tokens = nn.Embedding(cfg.text_vocab, cfg.dim)
        self.language_model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.language_model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.generation_embeddings = nn.Embedding(cfg.vocab_size, cfg.code_dim)
        self.generation_aligner = nn.Module()  # code -> the language model's width (Linear, then GELU + Linear)
        self.generation_aligner.fc1 = nn.Linear(cfg.code_dim, cfg.projection_dim)
        self.generation_aligner.hidden_layers = nn.ModuleList(
            nn.Linear(cfg.projection_dim, cfg.projection_dim) for _ in range(cfg.aligner_layers - 1))
        self.generation_head = nn.Module()  # hidden state -> image-code logits
        self.generation_head.proj_out = nn.Linear(cfg.dim, cfg.projection_dim)
        self.generation_head.vision_head = nn.Linear(cfg.projection_dim, cfg.vocab_size)
        self.register_buffer("rope", rope_1d(cfg.cls_token_num + cfg.block_size, cfg.head_dim, cfg.rope_base),
                             persistent=False)
        self.grad_checkpoint = False  # activation checkpointing of the teacher-forced forward (train_policy's switch)

    # -- what model_ar.generate() and token_logprobs() ask of a policy, as model_ar.GPT answers it --
    def embed_caption(self, ids):
        return self.language_model.embed_tokens(ids)

    def embed_tokens(self, tokens):
        h = self.generation_aligner.fc1(self.generation_embeddings(tokens))
        for layer in self.generation_aligner.hidden_layers:
            h = layer(F.gelu(h))
        return h.to(self.language_model.embed_tokens.weight.dtype)  # the residual stream: fp32 under autocast

    def null_caption(self, ids, mask):
        """CFG's unconditional prompt: every token but BOS and the image-start token becomes the pad token."""
        cfg = self.config
        return ids.masked_fill((ids != cfg.bos_id) & (ids != cfg.boi_id), cfg.pad_id), mask

    def head(self, h):
        return self.generation_head.vision_head(F.gelu(self.generation_head.proj_out(h))).float()

    def forward(self, tokens, cond, cond_mask, uncond=None):
        """Teacher-forced logits B x T x V (fp32): logits[:, t] predicts tokens[:, t] from the prompt ids
        `cond` (B x C, left-padded, ending in the image-start token; cond_mask 1 = token) and tokens[:, :t].
        Rows where `uncond` is True take the unconditional prompt (prompt dropout)."""
        if uncond is not None:
            cond = torch.where(uncond[:, None], self.null_caption(cond, cond_mask)[0], cond)
        h = torch.cat([self.embed_caption(cond), self.embed_tokens(tokens[:, :-1])], 1)
        L, C = h.shape[1], self.config.cls_token_num
        mask, rope = attention_mask(cond_mask, L), self.rope[:, :L]
        h = run_layers(self.language_model.layers, h, rope, mask, self.grad_checkpoint)
        return self.head(self.language_model.norm(h[:, C - 1:]))

    def setup_cache(self, batch, dtype):
        cfg = self.config
        c = self.language_model.layers[0].self_attn.kv_cache
        if c is not None and c.k.shape[0] == batch and c.k.dtype == dtype:
            return
        device = self.language_model.embed_tokens.weight.device
        for layer in self.language_model.layers:
            layer.self_attn.kv_cache = KVCache(batch, cfg.n_kv_head, cfg.cls_token_num + cfg.block_size, cfg.head_dim,
                                               dtype, device)

    def free_cache(self):
        for layer in self.language_model.layers:
            layer.self_attn.kv_cache = None

    def step(self, h, input_pos, mask):
        """Run new positions `input_pos` through the cached model; logits of the last one, B x V."""
        rope = self.rope[:, input_pos]
        for layer in self.language_model.layers:
            h = layer(h, rope, mask, input_pos)
        return self.head(self.language_model.norm(h[:, -1]))


POLICY_PREFIXES = ("language_model.", "generation_embeddings.", "generation_aligner.", "generation_head.")


def load_janus(path, folder, cls_token_num=128, n_layer=0):
    """The policy of Janus folder `folder` (config.json, generation_config.json), with the weights of
    `path`: the folder itself (transformers' `model.`-prefixed tensors) or a round's policy.safetensors.
    n_layer > 0 keeps the first n layers (the dry run's cut)."""
    cfg = janus_config(folder, cls_token_num=cls_token_num, **({"n_layer": n_layer} if n_layer else {}))
    if os.path.isdir(path):
        sd = read_pretrained(path, "model.", POLICY_PREFIXES)
        sd = {k: v for k, v in sd.items() if not k.startswith("language_model.layers.")
              or int(k.split(".")[2]) < cfg.n_layer}
    else:
        sd = read_state_dict(path)
    return load_exact(JanusPolicy(cfg), sd, f"the Janus policy of {folder} ({path})").eval()


_tokenizers = {}


def prompt_ids(prompts, folder, max_length, template=TEMPLATE):
    """Janus's image-generation prompts: the chat template around each prompt, tokenized (with the BOS
    the tokenizer adds), the image-start token appended, left-padded with the pad token to max_length.
    Returns (ids, mask), B x max_length each, on the CPU."""
    from transformers import AutoTokenizer
    cfg = janus_config(folder)
    if folder not in _tokenizers:
        _tokenizers[folder] = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok = _tokenizers[folder]
    if cfg.boi_id >= len(tok):
        raise ValueError(f"{folder}: the image-start token id {cfg.boi_id} (generation_config.json) is not in "
                         f"its tokenizer ({len(tok)} tokens)")
    ids = torch.full((len(prompts), max_length), cfg.pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), max_length, dtype=torch.long)
    for i, p in enumerate(prompts):
        row = tok(template.format(prompt=p.strip()))["input_ids"] + [cfg.boi_id]
        if len(row) > max_length:
            raise ValueError(f"the prompt {p[:60]!r} takes {len(row)} tokens with Janus's template, more than "
                             f"janus_prompt_len = {max_length}: raise it")
        ids[i, max_length - len(row):], mask[i, max_length - len(row):] = torch.tensor(row), 1
    return ids, mask


def export_janus(policy, vq, base, out):
    """A transformers Janus folder `out` that holds `policy` and `vq`'s decoder (a RankE run's, for
    JanusForConditionalGeneration.from_pretrained): every other tensor and every other file from `base`."""
    from model_vq import to_janus
    os.makedirs(out, exist_ok=True)
    tensors = read_pretrained(base, "")
    tensors.update({"model." + k: v for k, v in policy.state_dict().items()})
    tensors.update({"model.vqmodel." + k: v for k, v in to_janus(vq.state_dict()).items()})
    for f in os.listdir(base):
        if f.endswith((".json", ".model", ".txt")) and f != "model.safetensors.index.json":
            shutil.copy2(os.path.join(base, f), os.path.join(out, f))
    atomic_save(tensors, os.path.join(out, "model.safetensors"), {"format": "pt"})
