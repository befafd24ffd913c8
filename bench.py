"""Speed and memory of RankE (nanoGPT's bench.py in spirit). Random weights; any device.

--mode=speed (default): tokens/s and ms per decode step of the KV-cached CFG sampler, the teacher-forced
log-prob forward + backward that GRPO runs, and on CUDA the memory-bandwidth floor of a decode step.

--mode=memory: the per-GPU memory of the paper's setting (GPT-XL policy, VQ-16, reward CLIP ViT-L-14,
LPIPS, PatchGAN; config/llamagen_xl_clip.py) with both stages resident, against the policy-only baseline.
Weights and optimizer states are counted from the modules; activations by running each phase of the
training scripts on fake tensors (no memory is allocated) under bf16 autocast, then the method is checked
against a real fp32 step on the CPU.

    python bench.py                                                   # GPT-micro on CPU
    python bench.py --config=GPT-XL --batch_size=64 --device=cuda --compile=True   # the paper's policy
    python bench.py --mode=memory                                     # the paper's setting, on any machine
"""
import collections
import contextlib
import ctypes
import gc
import os
import resource
import time
import weakref
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

from configurator import configure
from model_ar import GPT, decode_one_token, generate, gpt_config, token_logprobs

mode = "speed"  # 'speed' | 'memory'
config = "GPT-micro"
batch_size = 8  # prompts; CFG doubles the rows
cfg_scale = 7.5
top_k = 1000
top_p = 1.0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if device == "cuda" else "float32"
compile = False  # torch.compile the decode step (on CUDA mode="reduce-overhead": CUDA graphs)
repeats = 3
bandwidth_GBps = 3350.0  # H100 SXM HBM3; used only on CUDA for the roofline
seed = 1337
# -- mode=memory: one GPU of config/llamagen_xl_clip.py (cfg_scale above; top_k=0, top_p=0.9 as there) --
policy_config = "GPT-XL"
prompts_per_gpu = 4  # x group_size rollouts per GPU per step (its chunks run one after another)
group_size = 8
prompts_per_chunk = 2  # sampled and trained per forward: 2 x 8 x 2 (CFG) = 32 rows
vq_config = "VQ-16"
image_size = 256  # sets the policy's image tokens too: (image_size / 16) ** 2 for VQ-16
decoder_batch = 16  # rollouts per Stage-2 forward
real_batch = 8  # real images per Stage-2 forward
clip_model = "ViT-L-14"  # the reward, 224 px
ref_dtype = "float32"  # pi_ref's weights
check = True  # check the counting against real fp32 steps on the CPU (Linux; ~15 s)
configure(globals())
if mode not in ("speed", "memory"):
    raise SystemExit(f"mode must be 'speed' or 'memory', not {mode!r}")

torch.manual_seed(seed)
ptdtype = getattr(torch, dtype)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """Best of `repeats` after a warm-up call; returns (seconds, warm-up seconds, output)."""
    t0 = time.perf_counter()
    fn()  # warm-up (and compilation)
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), first, out


if mode == "speed":
    cfg = gpt_config(config)
    model = GPT(cfg).to(device=device, dtype=ptdtype).eval()
    for p in model.parameters():  # random logits, not LlamaGen's all-zero output layer
        p.data.normal_(0, 0.02)
    C, T = cfg.cls_token_num, cfg.block_size
    cond = torch.randn(batch_size, C, cfg.caption_dim, device=device, dtype=ptdtype)
    mask = (torch.arange(C, device=device)[None] >= torch.randint(1, C, (batch_size, 1), device=device)).long()
    cond = cond * mask[..., None]
    decode_fn = decode_one_token
    if compile:  # CUDA graphs exist only on CUDA; elsewhere inductor's default mode
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead" if device == "cuda" else "default",
                                  fullgraph=True)

    n_params = sum(p.numel() for p in model.parameters())
    rows = batch_size * (2 if cfg_scale > 1 else 1)
    print(f"{config}: {n_params / 1e6:.1f}M parameters, {rows} rows x {T} tokens, {dtype} on {device}"
          f"{', compiled' if compile else ''}")
    t_gen, t_first, tokens = timed(lambda: generate(model, cond, mask, cfg_scale, 1.0, top_k, top_p, decode_fn=decode_fn))
    print(f"sampler: {t_gen:.3f} s per batch, {batch_size * T / t_gen:.0f} image tokens/s, "
          f"{1000 * t_gen / T:.2f} ms per decode step"
          f"{f' (first batch, compiling the step: {t_first:.1f} s)' if compile else ''}")
    if device == "cuda":
        # a decode step reads every weight it uses once (not the caption MLP, and one row of the token
        # embedding per sequence) and the whole static KV cache (SDPA runs over all slots, masked)
        kv = 2 * cfg.n_layer * rows * (C + T) * cfg.dim * ptdtype.itemsize
        unread = sum(p.numel() for m in (model.cls_embedding, model.tok_embeddings) for p in m.parameters())
        weights = (n_params - unread) * ptdtype.itemsize
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
        t_lp, _, _ = timed(logprob_step)
    print(f"teacher-forced log-probs, forward + backward: {1000 * t_lp:.0f} ms per batch "
          f"({batch_size * T / t_lp:.0f} tokens/s)")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak memory (process RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


# -- mode=memory --

class Tracker(TorchDispatchMode):
    """Memory of the tensors made inside its context: `live` bytes and their `peak` (a storage counts from
    the op that allocates it until its last tensor dies; views and in-place results allocate nothing),
    and `saved`, the bytes autograd keeps for backward, by `label` (only storages made inside, so weights
    and inputs are left out; autocast's bf16 copies of weights apart). Under FakeTensorMode nothing is
    allocated, and the sizes are those an eager run allocates."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.made, self.casts, self.counted = WeakIdKeyDictionary(), WeakIdKeyDictionary(), WeakIdKeyDictionary()
        self.saved, self.label = collections.Counter(), "activations"

    def free(self, n):
        self.live -= n

    def split(self):
        """The peak so far; the next starts from the bytes live now."""
        peak, self.peak = self.peak, self.live
        return peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            if s._cdata not in inputs and s not in self.made:
                self.made[s] = n = s.nbytes()
                self.live += n
                weakref.finalize(s, self.free, n)
                if func is torch.ops.aten._to_copy.default and isinstance(args[0], nn.Parameter):
                    self.casts[s] = True
        self.peak = max(self.peak, self.live)
        return out

    def pack(self, t):
        s = t.untyped_storage()
        if s in self.made and s not in self.counted:
            self.counted[s] = True
            self.saved["bf16 weight casts" if s in self.casts else self.label] += self.made[s]
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.hooks.__exit__(*exc)


class CudaFp32(TorchFunctionMode):
    """CUDA's autocast runs these in fp32 (they are on its fp32 list, not on the CPU's)."""
    ops = {F.group_norm, F.layer_norm, F.l1_loss, torch.Tensor.norm, torch.Tensor.pow}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t, (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def amp():
    """CUDA's bf16 autocast, on fake CPU tensors: CPU autocast (it caches the weight casts as CUDA's
    does) and CUDA's fp32 ops. CPU tensors also get a fused SDPA kernel, O(L) memory as CUDA's."""
    with torch.autocast("cpu", torch.bfloat16), CudaFp32():
        yield


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def size(m):
    return nbytes(m.parameters()) + nbytes(m.buffers())


def trainable(m):  # = its fp32 grads; AdamW's exp_avg + exp_avg_sq are twice this
    return nbytes(p for p in m.parameters() if p.requires_grad)


if mode == "memory":
    import open_clip
    from torchvision.models import vgg16

    from losses import LPIPS, Reward, bp_loss, cons_loss, patchgan, rank_gan_loss, rank_weights, rec_loss
    from model_vq import VQ_CONFIGS, VQModel, decoder_parameters

    GiB = 2 ** 30
    sampling = dict(cfg_scale=cfg_scale, temperature=1.0, top_k=0, top_p=0.9)
    # every module on the meta device: shapes and dtypes, no memory
    with torch.device("meta"):
        vq_cfg = VQ_CONFIGS[vq_config]
        gpt_cfg = gpt_config(policy_config, block_size=(image_size // 2 ** (len(vq_cfg.ch_mult) - 1)) ** 2)
        policy = GPT(gpt_cfg)
        ref = GPT(gpt_cfg).to(getattr(torch, ref_dtype)).requires_grad_(False)
        vq_reward = VQModel(vq_cfg).requires_grad_(False)  # Stage 1's, frozen
        vq = VQModel(vq_cfg).requires_grad_(False)
        for p in decoder_parameters(vq):  # Stage 2 trains post_quant_conv + decoder
            p.requires_grad_(True)
        ema = VQModel(vq_cfg).requires_grad_(False)
        disc = patchgan(3, 64, 3)
        clip = open_clip.create_model(clip_model, device="meta").eval().requires_grad_(False)
        vgg = {"features." + k: v for k, v in vgg16().features.state_dict().items()}
        lin = {f"lin{i}.model.1.weight": torch.empty(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
        with mock.patch("checkpoint.read_state_dict", {"vgg": vgg, "lin": lin}.get):  # LPIPS() reads files
            lpips = LPIPS("vgg", "lin")
    state = {  # (stage, component): bytes
        ("Stage 1", "policy weights (fp32)"): size(policy),
        ("Stage 1", "policy AdamW exp_avg + exp_avg_sq (fp32)"): 2 * trainable(policy),
        ("Stage 1", f"pi_ref ({ref_dtype}, EMA of the policy)"): size(ref),
        ("Stage 1", f"{vq_config} that decodes rollouts for the reward"): size(vq_reward),
        ("Stage 2", f"{vq_config} (post_quant_conv + decoder train)"): size(vq),
        ("Stage 2", "decoder AdamW (fp32)"): 2 * trainable(vq),
        ("Stage 2", f"EMA {vq_config}"): size(ema),
        ("Stage 2", "PatchGAN + grads + AdamW"): size(disc) + 3 * trainable(disc),
        ("Stage 2", "LPIPS VGG16 (frozen)"): size(lpips),
        ("shared", f"reward CLIP {clip_model} (frozen)"): size(clip),
    }
    # gradients live only while their stage runs: each step ends with zero_grad(set_to_none=True)
    grads = {"Stage 1": trainable(policy), "Stage 2": trainable(vq)}
    rows = 2 * prompts_per_chunk * group_size
    print(f"{policy_config} policy ({sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters), {vq_config}, "
          f"CLIP {clip_model}, LPIPS VGG16, PatchGAN. Per GPU: {prompts_per_gpu} prompts x {group_size} rollouts, "
          f"sampled and trained in chunks of {prompts_per_chunk} prompts ({rows} rows with CFG); Stage 2 "
          f"decodes {decoder_batch} rollouts + {real_batch} real images at {image_size} px per forward. bf16 autocast.")

    # the phases of train_policy.run and train_decoder.run on fake tensors; a Tracker counts what each makes
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    transient, notes = {}, {}
    with fake:
        for m in (policy, ref, vq_reward, vq, ema, disc, lpips, clip):
            m.to_empty(device="cpu")
        for p in [*policy.parameters(), *decoder_parameters(vq), *disc.parameters()]:
            p.grad = torch.zeros_like(p)  # resident: a chunk accumulates into them
        reward = Reward.__new__(Reward)  # Reward() reads open_clip weights from a file; the same object, fake CLIP
        reward.name, reward.differentiable, reward.model, reward.resize = "clip", True, clip, "crop"
        reward.size = open_clip.get_model_preprocess_cfg(clip)["size"][0]
        reward.mean, reward.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        reward.text_cache = {"": torch.zeros(clip.text_projection.shape[1])}  # text features: once per prompt
        n, C = prompts_per_chunk * group_size, gpt_cfg.cls_token_num
        cond, mask = torch.randn(n, C, gpt_cfg.caption_dim), torch.ones(n, C, dtype=torch.long)
        steps = []

        def decode_once(*args):  # the 255 decode steps repeat one step's memory: run the first, reuse its logits
            if not steps:
                steps.append(decode_one_token(*args))
            return steps[0]

        # Stage 1, a chunk's rollouts: sample, decode + score, pi_ref's log-probs (no grad, one autocast region)
        with Tracker() as t, torch.no_grad(), amp():
            codes, logp_old = generate(policy, cond, mask, return_logprobs=True, decode_fn=decode_once, **sampling)
            kv = sum(nbytes(layer.attention.kv_cache.buffers()) for layer in policy.layers)
            casts = sum(t.made[s] for s in t.casts)
            policy.free_cache()
            transient["Stage 1", "sampling"] = t.split()
            L = C + gpt_cfg.block_size
            notes["Stage 1", "sampling"] = (
                f"KV cache {kv / GiB:.2f} (= 2 x {gpt_cfg.n_layer} layers x {rows} rows x {L} x {gpt_cfg.dim} x 2 B: "
                f"{2 * gpt_cfg.n_layer * rows * L * gpt_cfg.dim * 2 / GiB:.2f}), "
                f"autocast's bf16 weight casts {casts / GiB:.2f}")
            rewards = reward(vq_reward.decode(codes), [""] * n).float()
            transient["Stage 1", f"reward: decode {n} rollouts + CLIP, no grad"] = t.split()
            token_logprobs(ref, codes, cond, mask, **sampling)
            transient["Stage 1", "pi_ref log-probs, no grad"] = t.split()
        # Stage 1, a chunk's GRPO forward + backward (grpo_loss's B x T terms are negligible, and its .item()
        # stats cannot run on fake tensors)
        with Tracker() as t:
            policy.output.register_forward_pre_hook(lambda m, a, t=t: setattr(t, "label", "logits head"))
            with amp():
                logp, entropy = token_logprobs(policy, codes, cond, mask, **sampling)
                loss = -(torch.exp(logp - logp_old) * rewards[:, None]).mean()
            loss.backward()
        transient["Stage 1", "GRPO chunk, forward + backward"] = t.peak
        notes["Stage 1", "GRPO chunk, forward + backward"] = "saved for backward: " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in t.saved.most_common()) + (
            f"; live but not saved: the fp32 logits {rows * gpt_cfg.block_size * gpt_cfg.vocab_size * 4 / GiB:.2f}, "
            f"top-p's sort")
        # after the backward: common.all_reduce_grads cats the grads into one flat tensor and divides it by
        # the world size (two fp32 copies at once); AdamW's foreach step (CUDA's default) makes one
        transient["Stage 1", "grad all-reduce over GPUs (flat copy, / world)"] = 2 * trainable(policy)
        transient["Stage 1", "AdamW step (foreach: sqrt(exp_avg_sq) copy)"] = trainable(policy)

        # Stage 2: encode the real images (no grad, no autocast), then a chunk's decoder step (Eq. 4)
        real = torch.rand(real_batch, 3, image_size, image_size) * 2 - 1
        codes = torch.randint(0, vq.config.codebook_size, (decoder_batch, (image_size // vq.downsample) ** 2))
        with Tracker() as t, torch.no_grad():
            gt_codes = vq.encode(real)
        transient["Stage 2", f"encode {real_batch} real images, no grad"] = t.peak
        with Tracker() as t:
            t.label = "other"
            parts = {"decoder": vq.decoder, "CLIP image tower": clip.visual, "LPIPS": lpips, "PatchGAN": disc}
            for name, m in parts.items():  # label what each saves for backward
                m.register_forward_pre_hook(lambda m, a, t=t, name=name: setattr(t, "label", name))
                m.register_forward_hook(lambda m, a, o, t=t: setattr(t, "label", "other"))
            with amp():
                images = vq.decode(codes)
                with torch.no_grad():
                    ema_images = ema.decode(codes)
                loss = (rec_loss(vq.decode(gt_codes), real, "l1", lpips) + cons_loss(images, ema_images)
                        + bp_loss(reward, images, [""] * decoder_batch)
                        + rank_gan_loss(disc(images), rank_weights(torch.rand(decoder_batch), 0.1, group_size)))
            loss.backward()
        transient["Stage 2", "decoder chunk, forward + backward"] = t.peak
        notes["Stage 2", "decoder chunk, forward + backward"] = "saved for backward: " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in t.saved.most_common())
        with Tracker() as t:  # disc_loss without its .item() accuracy
            with amp():
                d_loss = 0.5 * (F.relu(1 - disc(real)).mean() + F.relu(1 + disc(images.detach())).mean())
            d_loss.backward()
        transient["Stage 2", "discriminator step"] = t.peak
        transient["Stage 2", "grad all-reduce, AdamW steps"] = 2 * trainable(vq)

    def total(stage, table):
        return sum(v for (s, _), v in table.items() if s == stage)

    def peak(stage):
        return max(v for (s, _), v in transient.items() if s == stage)

    print(f"\n{'resident state':64}{'GiB':>7}")
    for (stage, name), v in state.items():
        print(f"  {stage:9}{name:53}{v / GiB:7.2f}")
    print(f"\n{'held while its stage runs':64}{'GiB':>7}")
    for stage, name in (("Stage 1", "policy grads (fp32)"), ("Stage 2", "decoder grads (fp32)")):
        print(f"  {stage:9}{name:53}{grads[stage] / GiB:7.2f}")
    print(f"\n{'transients (the peak of the bytes a phase makes)':64}{'GiB':>7}")
    for (stage, name), v in transient.items():
        print(f"  {stage:9}{name:53}{v / GiB:7.2f}")
        if (stage, name) in notes:
            print(f"  {'':11}{notes[stage, name]}")
    s1, s2, shared = total("Stage 1", state), total("Stage 2", state), total("shared", state)
    running = {stage: grads[stage] + peak(stage) for stage in grads}  # a stage's gradients + its transient
    policy_only = s1 + shared + running["Stage 1"]
    ranke = s1 + s2 + shared + max(running.values())
    larger = max(running, key=running.get)
    print(f"\npolicy-only: Stage-1 state {s1 / GiB:.2f} + CLIP {shared / GiB:.2f} + Stage 1's gradients and "
          f"transient {running['Stage 1'] / GiB:.2f} = {policy_only / GiB:.2f} GiB")
    print(f"RankE: Stage-1 state {s1 / GiB:.2f} + Stage-2 state {s2 / GiB:.2f} + CLIP {shared / GiB:.2f} + "
          f"{larger}'s gradients and transient {running[larger] / GiB:.2f} = {ranke / GiB:.2f} GiB")
    print(f"RankE / policy-only = {ranke / policy_only:.3f} (target <= 1.1); Stage 2's gradients and transient are "
          f"{abs(running['Stage 1'] - running['Stage 2']) / GiB:.2f} GiB "
          f"{'below' if larger == 'Stage 1' else 'above'} Stage 1's")

    if check and os.path.exists("/proc/self/clear_refs"):
        # The counting against a real run: the peak RSS growth of an fp32 forward + backward on this CPU.
        # glibc is told to hand every block over 128 KiB back to the system when freed (no dynamic
        # threshold), so that RSS follows the live bytes.
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD

        def status(key):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

        def with_grads(m):  # resident, as in training: the step accumulates into them
            for p in m.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            return m

        def gpt():
            return GPT(gpt_config("GPT-B", n_layer=2, dim=384, n_head=6, vocab_size=4096))

        def gpt_step(m, prompts=8):  # 16 rows with CFG
            c = m.config
            tokens = torch.randint(0, c.vocab_size, (prompts, c.block_size))
            cond = torch.randn(prompts, c.cls_token_num, c.caption_dim)
            token_logprobs(m, tokens, cond, torch.ones(cond.shape[:2], dtype=torch.long), **sampling)[0].sum().backward()

        def decoder():
            m = VQModel(vq_cfg).requires_grad_(False)
            for p in decoder_parameters(m):
                p.requires_grad_(True)
            return m

        def decoder_step(m, n=4, px=64):
            m.decode(torch.randint(0, m.config.codebook_size, (n, (px // m.downsample) ** 2))).square().mean().backward()

        print("\ncheck, an fp32 forward + backward on this CPU: estimated (fake tensors) vs measured (peak RSS growth)")
        for name, build, step in [("GPT-B layout, 2 layers, dim 384, vocab 4096, 16 rows", gpt, gpt_step),
                                  (f"{vq_config} decoder, 4 images at 64 px", decoder, decoder_step)]:
            with torch.device("meta"):
                m = build()
            with fake:
                with_grads(m.to_empty(device="cpu"))
                with Tracker() as t:
                    step(m)
            m = with_grads(build())
            step(m, 1)  # the first call allocates the libraries' own state
            gc.collect()
            libc.malloc_trim(0)
            base = status("VmRSS:")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            step(m)
            got = status("VmHWM:") - base
            print(f"  {name}: estimated {t.peak / 2**20:.0f} MiB (saved for backward "
                  f"{sum(t.saved.values()) / 2**20:.0f}), measured {got / 2**20:.0f} MiB ({got / t.peak - 1:+.1%})")
