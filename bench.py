"""Speed, memory and FLOPs of RankE (nanoGPT's bench.py in spirit). Random weights; any device.

--mode=speed (default): tokens/s and ms per decode step of the KV-cached CFG sampler, the teacher-forced
log-prob forward + backward that GRPO runs, and on CUDA the memory-bandwidth floor of a decode step.

--mode=flops: the FLOPs of one GRPO step and one decoder step of each preset at its real shapes (LlamaGen-XL:
GPT-XL, VQ-16, CLIP ViT-L-14, LPIPS, PatchGAN), per GPU, by phase: train_policy.run and train_decoder.run
themselves, on fake tensors (nothing is allocated or computed), counted by torch.utils.flop_counter.

--mode=memory: the per-GPU memory of the same steps with both stages resident (RankE) and with Stage 1 alone
(the policy-only baseline), for each preset and switch in `variants`. Weights and optimizer states are
counted from the modules; the rest by running the two stages' own code on fake tensors under bf16
autocast and following every tensor they make; the method is then checked against real fp32 steps on
this CPU.

--mode=step: train_policy's GRPO step at GPT-B shapes on this machine, with the code before issue 22 (a
sampler call and a no-grad pi_old forward per chunk) and now, as a ratio.

    python bench.py                                                   # GPT-micro on CPU
    python bench.py --config=GPT-XL --batch_size=64 --device=cuda --compile=True   # the paper's policy
    python bench.py --mode=flops                                      # ~30 s, any machine
    python bench.py --mode=memory                                     # ~2 min, any machine
"""
import collections
import contextlib
import ctypes
import gc
import os
import resource
import time
import weakref
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary
from torchvision.models import vgg16

from common import autocast, gpt_overrides, grad_scaler
from configurator import configure
from model_ar import GPT, decode_one_token, generate, gpt_config, token_logprobs

mode = "speed"  # 'speed' | 'flops' | 'memory' | 'gpu' | 'step'
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
# -- mode=flops and mode=memory: the presets' steps, per GPU of a world of `gpus` --
presets = ("config/llamagen_xl_clip.py,config/llamagen_xl_clip_24gb.py,config/released_llamagen_xl_clip.py,"
           "config/released_llamagen_xl_clip.py --grad_checkpoint=True")  # a config file, then --key=value switches
gpus = 8
check = True  # mode=memory: check the counting against real fp32 steps on the CPU (Linux; ~15 s)
# -- mode=gpu: what needs a GPU, in one command (a few minutes on one H100 / H200) --
gpu_sampler = "GPT-XL"  # the sampler, eager and compiled, on gpu_batch prompts
gpu_batch = 32
gpu_round = ("config/dryrun_xl.py --prompts_per_step=4 --group_size=8 --prompts_per_chunk=2 --decoder_batch=16 "
             "--real_batch=8 --decoder_chunks=2 --policy_steps=2 --decoder_steps=2")  # one GPU's share of the paper's step
# -- mode=step --
step_model = "GPT-B"
step_tokens = 64  # image tokens (VQ-16 at 128 px); 2 prompts x 4 rollouts, 1 prompt a chunk, CFG cfg_scale
configure(globals())
if mode not in ("speed", "flops", "memory", "gpu", "step"):
    raise SystemExit(f"mode must be 'speed', 'flops', 'memory', 'gpu' or 'step', not {mode!r}")

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


def random_policy(name, n):
    """A GPT of config `name` with random weights (not LlamaGen's all-zero output layer, which would make
    every logit 0) and n left-padded random captions."""
    cfg = gpt_config(name)
    model = GPT(cfg).to(device=device, dtype=ptdtype).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    C = cfg.cls_token_num
    mask = (torch.arange(C, device=device)[None] >= torch.randint(1, C, (n, 1), device=device)).long()
    return model, torch.randn(n, C, cfg.caption_dim, device=device, dtype=ptdtype) * mask[..., None], mask


def sampler_speed(model, cond, mask, compiled):
    """Time generate() on `model` (best of `repeats` after a warm-up) with an eager or a compiled decode
    step (CUDA graphs on CUDA, inductor elsewhere), print it and, on CUDA, the memory-bandwidth floor of a
    decode step; return the tokens."""
    cfg, n = model.config, len(cond)
    C, T, rows = cfg.cls_token_num, cfg.block_size, len(cond) * (2 if cfg_scale > 1 else 1)
    decode_fn = decode_one_token
    if compiled:
        decode_fn = torch.compile(decode_one_token, mode="reduce-overhead" if device == "cuda" else "default", fullgraph=True)
    t_gen, t_first, tokens = timed(lambda: generate(model, cond, mask, cfg_scale, 1.0, top_k, top_p, decode_fn=decode_fn))
    print(f"sampler, {'compiled' if compiled else 'eager'}: {t_gen:.3f} s per batch of {rows} rows, "
          f"{n * T / t_gen:.0f} image tokens/s, {1000 * t_gen / T:.2f} ms per decode step"
          f"{f' (first batch, compiling the step: {t_first:.1f} s)' if compiled else ''}")
    if device == "cuda":
        # a decode step reads every weight it uses once (not the caption MLP, and one row of the token
        # embedding per sequence) and the whole static KV cache (SDPA runs over all slots, masked)
        kv = 2 * cfg.n_layer * rows * (C + T) * cfg.dim * ptdtype.itemsize
        unread = sum(p.numel() for m in (model.cls_embedding, model.tok_embeddings) for p in m.parameters())
        weights = (sum(p.numel() for p in model.parameters()) - unread) * ptdtype.itemsize
        floor_ms = 1000 * (weights + kv) / (bandwidth_GBps * 1e9)
        print(f"  bandwidth floor: ({weights / 1e9:.2f} GB weights + {kv / 1e9:.2f} GB KV cache) / "
              f"{bandwidth_GBps:.0f} GB/s = {floor_ms:.2f} ms per step; achieved {floor_ms / (1000 * t_gen / T):.0%}")
    model.free_cache()
    return tokens


if mode == "speed":
    model, cond, mask = random_policy(config, batch_size)
    print(f"{config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {batch_size} prompts x "
          f"{model.config.block_size} tokens, CFG {cfg_scale}, {dtype} on {device}")
    tokens = sampler_speed(model, cond, mask, compile)

    def logprob_step():
        model.zero_grad(set_to_none=True)
        lp, _ = token_logprobs(model, tokens, cond, mask, cfg_scale, 1.0, top_k, top_p)
        lp.sum().backward()

    with torch.autocast(device, ptdtype, enabled=device == "cuda"):
        model.float()
        t_lp, _, _ = timed(logprob_step)
    print(f"teacher-forced log-probs, forward + backward: {1000 * t_lp:.0f} ms per batch "
          f"({batch_size * model.config.block_size / t_lp:.0f} tokens/s)")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    else:
        print(f"peak memory (process RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


# -- the stages' own code on fake tensors (mode=flops, mode=memory) --

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


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def size(m):
    return nbytes(m.parameters()) + nbytes(m.buffers())


def trainable(m):  # = its fp32 grads; AdamW's exp_avg + exp_avg_sq are twice this
    return nbytes(p for p in m.parameters() if p.requires_grad)


class Flops(TorchDispatchMode):
    """The FLOPs of the matmuls, convolutions and attentions run inside (torch.utils.flop_counter's
    formulas), by (`phase`, `part`). A tensor read as a Python number reads 1, so that the training
    scripts' own code (its .item() statistics, its finiteness checks) runs on fake tensors."""

    def __init__(self):
        super().__init__()
        self.phase, self.part, self.flops = "", "", collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.flops[self.phase, self.part] += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def fake_stages(c, fake):
    """What train_policy.init and train_decoder.init build from files, at the config's shapes with the
    fake weights of FakeTensorMode `fake`: Stage 1's and Stage 2's state, sharing the reward."""
    import open_clip

    import train_decoder
    import train_policy
    from losses import LPIPS, patchgan, run_reward
    from model_vq import VQ_CONFIGS, VQModel, decoder_parameters
    create = open_clip.create_model
    with torch.device("meta"):
        lpips_files = {c.lpips_vgg: {"features." + k: v for k, v in vgg16().features.state_dict().items()},
                       c.lpips_lin: {f"lin{i}.model.1.weight": torch.empty(1, ch, 1, 1)
                                     for i, ch in enumerate((64, 128, 256, 512, 512))}}
    with torch.device("meta"), mock.patch("losses.os.path.isfile", lambda path: True), \
            mock.patch("open_clip.create_model", lambda name, pretrained, device, **kw: create(name, device="meta", **kw)), \
            mock.patch("checkpoint.read_state_dict", lpips_files.get):
        reward = run_reward(c)
        policy, ref = GPT(gpt_config(c.gpt_model, **gpt_overrides(c))), GPT(gpt_config(c.gpt_model, **gpt_overrides(c)))
        vq_cfg = VQ_CONFIGS[c.vq_model]
        vq1, vq2, ema = (VQModel(vq_cfg).requires_grad_(False) for _ in range(3))
        disc = patchgan(3, c.disc_ndf, c.disc_layers)
        lpips = LPIPS(c.lpips_vgg, c.lpips_lin) if c.lpips_vgg and c.lpips_lin else None
    ref.requires_grad_(False)
    policy.grad_checkpoint = c.grad_checkpoint
    for p in decoder_parameters(vq2):
        p.requires_grad_(True)
    with fake:
        for m in filter(None, [policy, ref, vq1, vq2, ema, disc, lpips] + [r.model for _, r in reward.terms]):
            m.to_empty(device="cpu")
        prompts = ["a prompt"] * c.prompts_per_step
        s1 = train_policy.Policy(policy, vq1, reward, prompts, ref=ref, opt=torch.optim.AdamW(policy.parameters()),
                                 scaler=grad_scaler(c))
        s2 = train_decoder.Decoder(vq2, ema, disc, torch.optim.AdamW(decoder_parameters(vq2)),
                                   torch.optim.AdamW(disc.parameters()), grad_scaler(c), grad_scaler(c), reward, prompts,
                                   [("image.png", "a prompt")] * 64, lpips)
    return s1, s2


@contextlib.contextmanager
def rank0(c, world, first_step=lambda step: step(), repeat_step=lambda: None):
    """train_policy.run and train_decoder.run as rank 0 of `world` on fake tensors: collectives do nothing
    (every rank holds the same shapes), captions and real images are random, the rollouts file holds a
    global step's rollouts, and the sampler runs its first decode step (through `first_step`) and hands
    its logits back for the others, calling `repeat_step` (every step has one shape in the static cache)."""
    import train_decoder
    import train_policy
    n = c.prompts_per_step * c.group_size
    rollouts = {"codes": torch.randint(0, c.codebook_size, (n, c.block_size)), "rewards": torch.rand(n),
                "prompt_ids": torch.zeros(n, dtype=torch.long)}
    cond = torch.randn(1, c.cls_token_num, gpt_config(c.gpt_model).caption_dim)

    def sample(*args, decode_fn=None, **kwargs):
        logits = []

        def decode(*a):
            if logits:
                repeat_step()
            else:
                logits.append(first_step(lambda: decode_one_token(*a)))
            return logits[0]
        return train_generate(*args, **kwargs, decode_fn=decode)

    train_generate = train_policy.generate
    with mock.patch.multiple(dist, all_reduce=lambda t, *a, **k: None,
                             all_gather=lambda out, t, *a, **k: [o.copy_(t) for o in out]), \
            mock.patch.multiple(train_policy, generate=sample, caption_features=lambda texts, c, C: (
                cond.expand(len(texts), -1, -1), torch.ones(len(texts), C, dtype=torch.long))), \
            mock.patch.multiple(train_decoder, read_state_dict=lambda path: rollouts, check_rollouts=lambda *a: None,
                                load_image=lambda path, size: torch.rand(3, size, size) * 2 - 1), \
            mock.patch("tqdm.tqdm", lambda it, **kw: it):
        yield


def count_step(c, world):
    """FLOPs of rank 0's share of one GRPO step and one decoder step of config c (at its last round, so
    that every term is on), by phase (the functions the step calls) and part (the module or loss doing
    the work; an update's backward as one). Also the pass this project no longer runs: a no-grad pi_old
    forward a chunk (what old_logprobs='recompute' cost before pi_old came from epoch 1's forward)."""
    import train_decoder
    import train_policy
    count, tensor_backward, chunks, step = Flops(), torch.Tensor.backward, [], {}
    c.policy_steps = c.decoder_steps = 1

    def phase(name, fn):
        def run(*args, **kwargs):
            outer, count.phase = count.phase, name(*args) if callable(name) else name
            try:
                return fn(*args, **kwargs)
            finally:
                count.phase = outer
        return run

    def part(name, fn=None):
        def run(*args, **kwargs):
            count.part = name(*args) if callable(name) else name
            return fn(*args, **kwargs)
        return run if fn else lambda *_: setattr(count, "part", name)

    def first_step(run):
        before = sum(count.flops.values())
        out = run()
        step["flops"] = sum(count.flops.values()) - before
        return out

    def repeat_step():
        count.flops[count.phase, "sampler"] += step["flops"]

    def rollout(*args, run=train_policy.rollout):  # keeps the step's rollouts for the pi_old count below
        chunks[:] = run(*args)
        return chunks

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    s1, s2 = fake_stages(c, fake)
    clip = s1.reward.terms[0][1].model
    for m, name in ((s1.vq.post_quant_conv, "decoder"), (s1.vq.decoder, "decoder"), (clip.visual, "CLIP image tower"),
                    (s1.ref, "pi_ref, no grad"),
                    (clip.transformer, "CLIP text tower (once per prompt)"), (s1.policy, "policy forward")):
        m.register_forward_pre_hook(part(name))
    backward = part("backward", tensor_backward)
    with fake, rank0(c, world, first_step, repeat_step), count, mock.patch.object(torch.Tensor, "backward", backward):
        with mock.patch.multiple(train_policy, rollout=phase("rollouts", rollout), generate=part("sampler", train_policy.generate),
                                 ppo_epoch=phase(lambda s, c, ch, rnd, step, e, w: f"PPO epoch {e}", train_policy.ppo_epoch)):
            train_policy.run(s1, c, c.rounds, 0, world)
        count.phase = "removed: pi_old recompute"
        with torch.no_grad(), autocast(c):
            for r in chunks:
                token_logprobs(s1.policy, r.codes, r.cond, r.mask, c.cfg_scale, c.temperature, c.top_k, c.top_p,
                               c.logprob == "cond_only")
        stage1, count.flops = dict(count.flops), collections.Counter()
        for m, name in ((s2.vq.encoder, "encoder (a pair's first draw only)"), (s2.disc, "PatchGAN"),
                        (s2.ema.post_quant_conv, "EMA decoder, no grad (L_cons)"),
                        (s2.ema.decoder, "EMA decoder, no grad (L_cons)"), (clip.visual, "CLIP image tower (L_BP)")):
            m.register_forward_pre_hook(part(name))
        gt = set()

        def gt_codes(*args, encode=train_decoder.encode_once):
            out = encode(*args)
            gt.add(id(out))
            return out
        s2.vq.decode = part(lambda codes: ("decoder: ground-truth codes" if id(codes) in gt else "decoder: rollouts")
                            + ("" if torch.is_grad_enabled() else ", no grad"), s2.vq.decode)
        with mock.patch.multiple(train_decoder, encode_once=gt_codes, rec_loss=part("L_rec: L1 + LPIPS", train_decoder.rec_loss),
                                 cons_loss=part(f"L_cons: {c.cons_kind}", train_decoder.cons_loss),
                                 disc_step=phase("discriminator step", train_decoder.disc_step)):
            count.phase = "decoder step"
            train_decoder.run(s2, c, c.rounds, "rollouts", 0, world)
    return stage1, dict(count.flops)


class Phases:
    """The peak of the bytes a Tracker follows, by the phase (a wrapped function) running; nested phases
    take their own share."""

    def __init__(self, tracker):
        self.tracker, self.stack, self.peak = tracker, [], collections.Counter()

    def close(self):
        peak = self.tracker.split()
        if self.stack:
            self.peak[self.stack[-1]] = max(self.peak[self.stack[-1]], peak)

    def wrap(self, name, fn):
        def run(*args, **kwargs):
            self.close()
            self.stack.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.close()
                self.stack.pop()
        return run


def memory(c, world):
    """Per-GPU bytes of config c: the resident state of each stage (weights, AdamW states, frozen models),
    and the peak of what each stage's step makes on top (its gradients included), by phase."""
    import train_decoder
    import train_policy
    from model_vq import decoder_parameters
    c.policy_steps = c.decoder_steps = 1
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    s1, s2 = fake_stages(c, fake)
    clip = s1.reward.terms[0][1].model
    state = {  # (stage, component): bytes
        ("Stage 1", "policy weights (fp32)"): size(s1.policy),
        ("Stage 1", "policy AdamW exp_avg + exp_avg_sq (fp32)"): 2 * trainable(s1.policy),
        ("Stage 1", "pi_ref (fp32)"): size(s1.ref),
        ("Stage 1", f"{c.vq_model} that decodes rollouts for the reward"): size(s1.vq),
        ("Stage 2", f"{c.vq_model} (post_quant_conv + decoder train)"): size(s2.vq),
        ("Stage 2", "decoder AdamW (fp32)"): 2 * trainable(s2.vq),
        ("Stage 2", f"EMA {c.vq_model}"): size(s2.ema),
        ("Stage 2", "PatchGAN + AdamW"): size(s2.disc) + 2 * trainable(s2.disc),
        ("Stage 2", "LPIPS VGG16 (frozen)"): size(s2.lpips) if s2.lpips else 0,
        ("shared", f"reward CLIP {c.clip_model} (frozen)"): size(clip),
    }
    with fake:
        for opt, params in ((s1.opt, s1.policy.parameters()), (s2.opt, decoder_parameters(s2.vq)),
                            (s2.opt_d, s2.disc.parameters())):  # AdamW's states exist before the step (counted above)
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
    peaks, saved, tracker = {}, {}, [None]
    for m, name in ((s1.policy.layers[0], "policy blocks"), (s1.policy.output, "logits head"), (s2.vq.decoder, "decoder"),
                    (clip.visual, "CLIP image tower"), (s2.lpips, "LPIPS"), (s2.disc, "PatchGAN")):
        if m is not None:  # what each saves for backward
            m.register_forward_pre_hook(lambda *_, name=name: setattr(tracker[0], "label", name))
            if name not in ("policy blocks", "logits head"):
                m.register_forward_hook(lambda *_: setattr(tracker[0], "label", "other"))
    with fake, rank0(c, world), CudaFp32():
        for stage, run, outer, chunks in (
                ("Stage 1", lambda: train_policy.run(s1, c, c.rounds, 0, world), "the step, between its phases",
                 c.ppo_epochs * c.prompts_per_step // c.prompts_per_chunk // world),
                ("Stage 2", lambda: train_decoder.run(s2, c, c.rounds, "rollouts", 0, world),
                 "decoder step: forward + backward", c.decoder_chunks // world)):
            with Tracker() as t, Flops():
                p, tracker[0], t.label = Phases(t), t, "other"
                s1.opt.step, s2.opt.step = p.wrap("AdamW step", s1.opt.step), p.wrap("AdamW step", s2.opt.step)
                with mock.patch.multiple(train_policy, rollout=p.wrap("rollouts: sampling, reward, pi_ref", train_policy.rollout),
                                         ppo_epoch=p.wrap("PPO epoch: forward + backward", train_policy.ppo_epoch),
                                         all_reduce_grads=p.wrap("gradient all-reduce", train_policy.all_reduce_grads)), \
                        mock.patch.multiple(train_decoder, all_reduce_grads=p.wrap("gradient all-reduce", train_decoder.all_reduce_grads),
                                            disc_step=p.wrap("discriminator step", train_decoder.disc_step)), \
                        mock.patch.object(train_policy, "generate", p.wrap("sampling (KV cache)", train_policy.generate)):
                    p.wrap(outer, run)()
                del s1.opt.step, s2.opt.step
            peaks[stage], saved[stage] = dict(p.peak), {k: v / chunks for k, v in t.saved.items()}
    return state, peaks, saved


GiB = 2 ** 30


def memory_table(c, world, detail):
    state, peaks, saved = memory(c, world)
    total = {s: sum(v for (st, _), v in state.items() if st == s) for s in ("Stage 1", "Stage 2", "shared")}
    peak = {s: max(peaks[s].values()) for s in peaks}
    if detail:
        print(f"\n{'resident state':64}{'GiB':>7}")
        for (stage, name), v in state.items():
            print(f"  {stage:9}{name:53}{v / GiB:7.2f}")
        print(f"\n{'what a step makes on top, by phase (peak; gradients included)':64}{'GiB':>7}")
        for stage in peaks:
            for name, v in peaks[stage].items():
                print(f"  {stage:9}{name:53}{v / GiB:7.2f}")
            print(f"  {'':11}saved for backward by a training chunk: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in
                                                         sorted(saved[stage].items(), key=lambda kv: -kv[1])))
    policy_only = total["Stage 1"] + total["shared"] + peak["Stage 1"]
    ranke = sum(total.values()) + max(peak.values())
    return [total["Stage 1"], total["Stage 2"], total["shared"], peak["Stage 1"], peak["Stage 2"], policy_only, ranke]


if mode in ("flops", "memory", "gpu"):
    import ranke
    if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:  # CPU's fused kernel
        @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
        def _(q, k, v, *args, out_val=None, **kwargs):
            return sdpa_flop_count(q.shape, k.shape, v.shape)

        @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
        def _(grad, q, k, v, *args, out_val=None, **kwargs):
            return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)

if mode == "flops":
    T = 1e12
    for preset in presets.split(","):
        c = ranke.config(preset.split(), device="cpu", dtype="bfloat16")
        t0 = time.perf_counter()
        stage1, stage2 = count_step(c, gpus)
        removed = sum(v for (ph, _), v in stage1.items() if ph.startswith("removed"))
        rows = c.prompts_per_step * c.group_size // gpus
        print(f"\n{preset}, per GPU of {gpus}: a GRPO step samples {rows} rollouts of {c.block_size} tokens (CFG "
              f"{c.cfg_scale}) and runs {c.ppo_epochs} PPO epoch(s) (logprob {c.logprob}); a decoder step "
              f"{c.decoder_chunks // gpus} chunk(s) of {c.decoder_batch} rollouts + {c.real_batch} real images. "
              f"TFLOP, counted in {time.perf_counter() - t0:.0f} s:")
        for step, table in (("GRPO step", stage1), ("decoder step", stage2)):
            phases = list(dict.fromkeys(ph for ph, _ in table))
            for (ph, pt), v in sorted(table.items(), key=lambda kv: phases.index(kv[0][0])):
                if not ph.startswith("removed"):
                    print(f"  {ph:20}{pt:40}{v / T:10.4g}")
            print(f"  {step + ' total':60}{(sum(table.values()) - removed * (table is stage1)) / T:10.4g}")
        print(f"  {'before: + a no-grad pi_old forward a chunk' if c.old_logprobs == 'recompute' else 'no pi_old pass before either':60}"
              f"{removed * (c.old_logprobs == 'recompute') / T:10.4g}")

if mode == "memory":
    cols = ("Stage-1 state", "Stage-2 state", "CLIP", "Stage-1 step", "Stage-2 step", "policy-only", "RankE")
    rows = []
    for preset in presets.split(","):
        c = ranke.config(preset.split(), device="cpu", dtype="bfloat16")
        if not rows:
            print(f"{preset}, per GPU of {gpus}, bf16 autocast, in detail:")
        rows.append((preset.replace("config/", ""), memory_table(c, gpus, detail=not rows)))
    print(f"\nper GPU of {gpus}, GiB{'':33}" + "".join(f"{k:>14}" for k in cols) + f"{'RankE / policy-only':>21}")
    for name, v in rows:
        print(f"  {name:50}" + "".join(f"{x / GiB:14.2f}" for x in v) + f"{v[-1] / v[-2]:21.3f}")

    if check and os.path.exists("/proc/self/clear_refs"):
        from model_vq import VQ_CONFIGS, VQModel, decoder_parameters
        fake, vq_cfg = FakeTensorMode(allow_non_fake_inputs=True), VQ_CONFIGS["VQ-16"]
        sampling = dict(cfg_scale=7.5, temperature=1.0, top_k=0, top_p=0.9)
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

        def gpt(recompute=False):
            m = GPT(gpt_config("GPT-B", n_layer=4, dim=384, n_head=6, vocab_size=4096))
            m.grad_checkpoint = recompute
            return m

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
        for name, build, step in [("GPT-B layout, 4 layers, dim 384, vocab 4096, 16 rows", gpt, gpt_step),
                                  ("the same, activation checkpointing", lambda: gpt(True), gpt_step),
                                  ("VQ-16 decoder, 4 images at 64 px", decoder, decoder_step)]:
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


# -- mode=gpu --

if mode == "gpu":
    import json
    import shutil
    import tempfile
    model, cond, mask = random_policy(gpu_sampler, gpu_batch)
    print(f"{gpu_sampler}, {gpu_batch} prompts, CFG {cfg_scale}, {dtype} on {device}")
    for compiled in (False, True) if device == "cuda" else (False,):
        sampler_speed(model, cond, mask, compiled)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    seconds = {}
    for run in ("ranke", "policy_only"):  # a round of each, measured against the memory count of its config
        out = tempfile.mkdtemp(prefix=f"bench_{run}_")
        c = ranke.main([*gpu_round.split(), f"--mode={run}", f"--out_dir={out}", f"--device={device}",
                        f"--dtype={dtype}", "--rounds=1", "--eval_every=0", "--sample_every=0"])
        m = json.loads(open(os.path.join(out, "metrics.jsonl")).readlines()[-1])
        shutil.rmtree(out)
        seconds[run] = m["policy_time_s"] + m.get("decoder_time_s", 0)
        S1, S2, CLIP, step1, step2, _, _ = memory_table(c, 1, detail=False)
        resident = S1 + CLIP + (S2 if run == "ranke" else 0)
        print(f"{run} round ({c.policy_steps} + {c.decoder_steps if run == 'ranke' else 0} steps): {seconds[run]:.1f} s; "
              f"peak memory, measured (counted): Stage 1 {m['policy_peak_gb']:.2f} ({(resident + step1) / GiB:.2f}) GiB"
              + (f", Stage 2 {m['decoder_peak_gb']:.2f} ({(resident + step2) / GiB:.2f}) GiB" if run == "ranke" else "")
              + ("" if device == "cuda" else " (on a CPU: the process's peak RSS, weights and libraries included)"))
    print(f"RankE / policy-only time a round: {seconds['ranke'] / seconds['policy_only']:.2f}")


# -- mode=step --

if mode == "step":
    import ranke
    import train_policy
    c = ranke.config([], device=device, dtype=dtype, gpt_model=step_model, vq_model="VQ-16",
                     image_size=16 * int(step_tokens ** 0.5), prompts_per_step=2, prompts_per_chunk=1, group_size=4,
                     policy_steps=1, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p)
    policy = GPT(gpt_config(step_model, block_size=c.block_size)).to(device)
    for p in policy.parameters():  # random logits, not LlamaGen's all-zero output layer
        p.data.normal_(0, 0.02)
    ref = GPT(policy.config).to(device).requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(seed)
    s = train_policy.Policy(policy, SimpleNamespace(decode=lambda codes: codes),
                            lambda images, texts: torch.rand(len(texts), generator=g).to(device), ["a prompt"] * 8,
                            ref=ref, opt=torch.optim.AdamW(policy.parameters(), lr=1e-6), scaler=grad_scaler(c))
    cond = torch.randn(1, c.cls_token_num, policy.config.caption_dim, device=device)

    def before(*args, rollout=train_policy.rollout):
        """The code before: a sampler call per chunk, then a no-grad pi_old forward of each chunk."""
        c.sample_batch = c.prompts_per_chunk
        chunks = rollout(*args)
        c.sample_batch = 0
        with torch.no_grad(), autocast(c):
            for r in chunks:
                r.logp_old = token_logprobs(policy, r.codes, r.cond, r.mask, c.cfg_scale, c.temperature, c.top_k,
                                            c.top_p, c.logprob == "cond_only")[0].float()
        return chunks

    times = collections.defaultdict(list)
    with mock.patch("tqdm.tqdm", lambda it, **kw: it), mock.patch.multiple(train_policy, caption_features=lambda texts, c, C: (
            cond.expand(len(texts), -1, -1), torch.ones(len(texts), C, dtype=torch.long, device=device))):
        for name in ("now", "before", "now", "before", "now", "before", "now"):  # the first is the warm-up
            with mock.patch.object(train_policy, "rollout", before if name == "before" else train_policy.rollout):
                sync()
                t0 = time.perf_counter()
                train_policy.run(s, c, 1)
                sync()
                times[name].append(time.perf_counter() - t0)
    t_before, t_now = min(times["before"]), min(times["now"][1:])
    print(f"a GRPO step of train_policy.run, {step_model} ({sum(p.numel() for p in policy.parameters()) / 1e6:.0f}M), "
          f"{c.prompts_per_step} prompts x {c.group_size} rollouts of {c.block_size} tokens, CFG {c.cfg_scale}, "
          f"{c.ppo_epochs} PPO epochs, {dtype} on {device} (reward left out): before {t_before:.2f} s, now "
          f"{t_now:.2f} s, now / before = {t_now / t_before:.3f}")
