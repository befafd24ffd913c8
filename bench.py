"""Sampler speed of the RankE policy (nanoGPT's bench.py in spirit): tokens/s and ms per decode step of
the KV-cached CFG sampler, the teacher-forced log-prob forward + backward that GRPO runs, and the
memory-bandwidth floor of a decode step. Random weights; any device.

    python bench.py                                                   # GPT-micro on CPU
    python bench.py --config=GPT-XL --batch_size=64 --device=cuda --compile=True   # the paper's policy
"""
import resource
import time

import torch

from configurator import configure
from model_ar import GPT, decode_one_token, generate, gpt_config, token_logprobs

config = "GPT-micro"
batch_size = 8  # prompts; CFG doubles the rows
cfg_scale = 7.5
top_k = 1000
top_p = 1.0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if device == "cuda" else "float32"
compile = False  # torch.compile the decode step (mode="reduce-overhead": CUDA graphs)
repeats = 3
bandwidth_GBps = 3350.0  # H100 SXM HBM3; used only on CUDA for the roofline
seed = 1337
configure(globals())

torch.manual_seed(seed)
ptdtype = getattr(torch, dtype)
cfg = gpt_config(config)
model = GPT(cfg).to(device=device, dtype=ptdtype).eval()
for p in model.parameters():  # random logits, not LlamaGen's all-zero output layer
    p.data.normal_(0, 0.02)
C, T = cfg.cls_token_num, cfg.block_size
cond = torch.randn(batch_size, C, cfg.caption_dim, device=device, dtype=ptdtype)
mask = (torch.arange(C, device=device)[None] >= torch.randint(1, C, (batch_size, 1), device=device)).long()
cond = cond * mask[..., None]
decode_fn = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compile else decode_one_token


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    fn()  # warm-up (and compilation)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


n_params = sum(p.numel() for p in model.parameters())
rows = batch_size * (2 if cfg_scale > 1 else 1)
print(f"{config}: {n_params / 1e6:.1f}M parameters, {rows} rows x {T} tokens, {dtype} on {device}"
      f"{', compiled' if compile else ''}")
t_gen, tokens = timed(lambda: generate(model, cond, mask, cfg_scale, 1.0, top_k, top_p, decode_fn=decode_fn))
print(f"sampler: {t_gen:.3f} s per batch, {batch_size * T / t_gen:.0f} image tokens/s, "
      f"{1000 * t_gen / T:.2f} ms per decode step")
if device == "cuda":
    # each decode step reads every weight once and the whole static KV cache (SDPA over all slots)
    kv = 2 * cfg.n_layer * rows * (C + T) * cfg.dim * ptdtype.itemsize
    weights = n_params * ptdtype.itemsize
    floor_ms = 1000 * (weights + kv) / (bandwidth_GBps * 1e9)
    print(f"bandwidth floor: ({weights / 1e9:.2f} GB weights + {kv / 1e9:.2f} GB KV cache) / "
          f"{bandwidth_GBps:.0f} GB/s = {floor_ms:.2f} ms per step; achieved {floor_ms / (1000 * t_gen / T):.0%}")
model.free_cache()


def logprob_step():
    model.zero_grad(set_to_none=True)
    lp, _ = token_logprobs(model, tokens, cond, mask, cfg_scale, 1.0, top_k, top_p)
    lp.sum().backward()


with torch.autocast(device, ptdtype, enabled=device == "cuda"):
    model.float()
    t_lp, _ = timed(logprob_step)
print(f"teacher-forced log-probs, forward + backward: {1000 * t_lp:.0f} ms per batch "
      f"({batch_size * T / t_lp:.0f} tokens/s)")
if device == "cuda":
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
else:
    print(f"peak memory (process RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
