"""What both stages share: the run's models, data and reward (config), DDP from torchrun's
environment, prompts and image-caption pairs, caption features, and the files of a round.

A round is a folder `out_dir/round_NNNN` of plain safetensors files (policy, policy_ref, decoder,
decoder_ema, disc, rollouts, the optimizer states) and a `meta.json`. It is written as
`round_NNNN.tmp` and renamed when complete, so a crash at any moment leaves the last complete round
intact. round_0000 holds the base models.
"""
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from checkpoint import BadInput, atomic_save, file_digest, fsync, read_state_dict
from configurator import configure, defaults
from model_ar import clean_caption, gpt_config, load_gpt
from model_janus import TEMPLATE, janus_config, load_janus, prompt_ids
from model_vq import VQ_CONFIGS, load_decoder, load_vq

# -- config shared by train_policy.py, train_decoder.py and ranke.py (overridden the same way).
#    The defaults are the embedded shapes world; config/llamagen_xl_*.py set the real models. --
out_dir = "out/ranke"
prepare = "data/shapes/prepare.py --out=out/shapes"  # run first (with this Python) to build what is missing; "" = none
backbone = "llamagen"  # the policy: 'llamagen' (t2i GPT, T5 captions) | 'janus' (Janus-Pro through its transformers folder)
gpt_model = "GPT-micro"  # LlamaGen's GPT config; a Janus folder's config.json gives its own
gpt_layers = 0  # 0 = the model's own depth; fewer = the same width cut short (the XL dry run)
gpt_ckpt = "out/shapes/gpt.pt"  # LlamaGen: the t2i .pt; Janus: the transformers folder (policy, tokenizer, VQ)
janus_prompt_len = 128  # Janus: prompt slots (template + prompt + image-start token), left-padded
janus_template = TEMPLATE  # Janus: the chat template each prompt is put in
vq_model = "VQ-micro"
vq_ckpt = "out/shapes/vq.pt"
image_size = 64
t5_path = "out/shapes/t5"
train_prompts = "data/shapes/prompts_hard.txt"  # .txt (a prompt a line), .csv / .tsv (a Prompt column) or .jsonl;
#                                                the default: the 8 training prompts the shipped base draws worst
#                                                (data/shapes/hard_prompts.py); the world's all: out/shapes/prompts_train.txt
train_pairs = "out/shapes/pairs.jsonl"  # {"image": path, "caption": text} a line: real images for Stage 2
reward = "clip"  # terms joined by '+': 'clip' (differentiable) | 'hpsv2' (black box) | 'aesthetic' (LAION head on CLIP-L)
clip_model = "out/shapes/clip.json"  # an open_clip model name, or the path of an open_clip JSON config
clip_weights = "out/shapes/clip.pt"
clip_quick_gelu = False  # True for OpenAI's weights
clip_scale = 1.0  # each term's weight in the reward: the release scores 100 cos
hps_weights = ""
hps_scale = 1.0
hps_input = "tensor"  # HPSv2's input: 'tensor' (reward_resize, in torch) | 'pil' (uint8 PIL images and open_clip's PIL
#                       transform: the release, vqrl_models.py:302-304)
hps_fp16 = False  # HPSv2's forward and its cosine under fp16 autocast (the release: torch.cuda.amp.autocast(), vqrl_models.py:307)
aesthetic_weights = ""  # sac+logos+ava1-l14-linearMSE.pth
aesthetic_scale = 1.0
reward_resize = "crop"  # images to the reward's square: 'crop' (open_clip's bicubic + centre crop) | 'squash' (release)
score_fp32 = False  # the rewards (L_BP's too) and L_cons's LPIPS outside autocast, in fp32 (the release); with
#                     dtype float32, the same either way
t5_dtype = "float32"  # T5's weights and activations: 'float32' | 'bfloat16' (the release's T5Embedder); cached apart
caption_padding = "left"  # T5 features 'left'-padded (LlamaGen's training layout) | 'right' (the release's training) |
#                           'right_zeroed' (every pad zero, the last one too: the release's COCO / HPSv2 samplers)
group_size = 8  # G rollouts per prompt (Table F.1)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; master weights fp32
seed = 0
SWITCHES = {"backbone": ("llamagen", "janus"), "t5_dtype": ("float32", "bfloat16"), "hps_input": ("tensor", "pil"),
            "caption_padding": ("left", "right", "right_zeroed"), "reward_resize": ("crop", "squash")}
DERIVED = ("block_size", "codebook_size", "cls_token_num", "t5_cache", "run_id", "prompts_sha1", "round")  # not settings
MODEL_KEYS = ("backbone", "gpt_model", "gpt_layers", "vq_model", "image_size", "group_size", "t5_dtype")  # a round's files and rollouts fit these


def bad_switch(c, switches):
    """The message for the first string switch whose value is not one of its choices, else ''."""
    return next((f"{k} must be one of {', '.join(map(repr, v))}, not {getattr(c, k)!r}"
                 for k, v in switches.items() if getattr(c, k) not in v), "")


# ranges of numeric settings: (test, the range in words); each stage lists its own in RANGES
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
POSITIVE = (lambda v: v > 0, "> 0")
UNIT = (lambda v: 0 <= v <= 1, "within [0, 1]")
BETAS = (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers within [0, 1), e.g. (0.9, 0.999)")
RANGES = {"group_size": (lambda v: v >= 2, ">= 2 (a group of one has no ranking: its advantage is always 0)"),
          "image_size": AT_LEAST_1, "clip_scale": POSITIVE, "hps_scale": POSITIVE, "aesthetic_scale": POSITIVE}


def out_of_range(c, ranges):
    """The first setting outside its range, as a message naming the range; '' if none."""
    return next((f"{k} must be {want}, not {getattr(c, k)!r}" for k, (ok, want) in ranges.items() if not ok(getattr(c, k))), "")


def split_hint(n, world, step=1):
    """The smallest multiple of `world` that is >= n and a multiple of `step`."""
    m = world * math.ceil(n / world)
    while m % step:
        m += world
    return m


def check(c, world=1):
    """The shared settings (switches, precision, models, data, reward): the first that cannot run, as one
    message saying how to fix it; '' if none. Each stage adds its own `check`, run alone or by ranke.py."""
    from losses import reward_terms
    msg = bad_switch(c, SWITCHES) or out_of_range(c, RANGES)
    if msg:
        return msg
    try:
        check_dtype(c.device, c.dtype)
    except SystemExit as e:
        return str(e)
    for key in ("gpt_ckpt", "vq_ckpt", "train_prompts", "train_pairs"):  # a Janus checkpoint is a folder
        path = getattr(c, key)
        if not (os.path.isfile(path) or (c.backbone == "janus" and key.endswith("ckpt") and os.path.isdir(path))):
            return f"{key} not found: {path}"
    if c.backbone == "janus":
        if c.caption_padding != "left":
            return "Janus prompts are left-padded, as its processor pads them: set caption_padding=left"
        try:  # the image grid the checkpoint generates, and every training prompt within janus_prompt_len
            check_janus_image(c, janus_config(c.gpt_ckpt))
            prompt_ids(read_prompts(c.train_prompts), c.gpt_ckpt, c.cls_token_num, c.janus_template)
        except (FileNotFoundError, ValueError) as e:
            return str(e)
    elif not os.path.isdir(c.t5_path):
        return f"t5_path not found: {c.t5_path} (a local T5 encoder folder: its config, weights and tokenizer)"
    else:  # every training prompt within the caption slots (T5 would cut a longer one)
        msg = long_prompt(c.train_prompts, c.t5_path, c.cls_token_num)
        if msg:
            return msg
    try:
        terms = reward_terms(c)
    except ValueError as e:
        return str(e)
    files = {"clip": c.clip_weights, "hpsv2": c.hps_weights, "aesthetic": c.aesthetic_weights}
    for t in terms + (["clip"] if "aesthetic" in terms else []):
        if not os.path.isfile(files[t]):
            return f"{t} reward weights not found: {files[t]!r}"
    read_pairs(c.train_pairs, check_images=True)
    return ""


def long_prompt(path, t5_path, slots):
    """The first prompt of `path` with more T5 tokens (</s> included) than the policy's caption slots, as
    a message naming it; '' if none."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(t5_path, local_files_only=True)
    prompts = read_prompts(path)
    for i, ids in enumerate(tokenizer([clean_caption(p) for p in prompts]).input_ids):
        if len(ids) > slots:
            return (f"{path}: prompt {i + 1} ({prompts[i][:60]!r}...) is {len(ids)} T5 tokens, more than the policy's "
                    f"{slots} caption slots, and T5 would cut it: shorten it or leave it out")
    return ""


def make_config(cfg, argv=None, **forced):
    """The run's config from `cfg` (the defaults of the scripts that take part), a config file and
    --key=value overrides (argv, default sys.argv), then `forced`; plus what follows from the models."""
    configure(cfg, argv)
    cfg.update(forced)
    c = SimpleNamespace(**cfg)
    if c.vq_model not in VQ_CONFIGS:
        raise SystemExit(f"unknown vq_model {c.vq_model!r}: one of {sorted(VQ_CONFIGS)}")
    vq_cfg = VQ_CONFIGS[c.vq_model]
    down = 2 ** (len(vq_cfg.ch_mult) - 1)
    if c.image_size % down:
        raise SystemExit(f"image_size {c.image_size} is not a multiple of {c.vq_model}'s {down}x downsampling: "
                         f"its codes cannot tile the image")
    c.block_size = (c.image_size // down) ** 2
    c.codebook_size = vq_cfg.codebook_size
    c.cls_token_num = c.janus_prompt_len if c.backbone == "janus" else gpt_config(c.gpt_model).cls_token_num
    c.t5_cache = t5_cache(c, c.out_dir)
    return c


def t5_cache(c, folder):
    """The file caching a run's T5 features, by prompt, in `folder` (one for each T5 dtype)."""
    return os.path.join(folder, "t5_cache.safetensors" if c.t5_dtype == "float32" else f"t5_cache_{c.t5_dtype}.safetensors")


def gpt_overrides(c):
    """The policy's config changes: its block of image tokens, and the layer count of a dry run."""
    return {"block_size": c.block_size, **({"n_layer": c.gpt_layers} if c.gpt_layers else {})}


def check_janus_image(c, cfg):
    """A Janus checkpoint generates a fixed grid of image tokens (its JanusConfig `cfg`): image_size must make it."""
    side, ours = int(cfg.block_size ** 0.5), int(c.block_size ** 0.5)
    if side != ours:
        raise ValueError(f"{c.gpt_ckpt} generates {side} x {side} image tokens, and image_size {c.image_size} with "
                         f"{c.vq_model} makes {ours} x {ours}: set image_size={side * c.image_size // ours}")


def load_policy(c, path):
    """The run's policy with the weights of `path` (the base checkpoint, or a round's policy.safetensors)."""
    if c.backbone == "janus":
        policy = load_janus(path, c.gpt_ckpt, c.cls_token_num, c.gpt_layers)
        check_janus_image(c, policy.config)
        return policy
    return load_gpt(path, c.gpt_model, **gpt_overrides(c))


def standalone_config(module, argv=None, uses=()):
    """A stage run alone (one process) from round folder `--init_from` of a run into a new `--out_dir`: the
    stage's settings as ranke.py would run them now (the constants at the top of common.py and of the
    stage's file, then a config file and --key=value), checked by the stage's own `check`; the round
    folder decides only what must match (its models, group size and prompts: refused, with what differs,
    if not), and the round is the one after init_from's (it seeds the draws). `uses`: other stages whose
    settings the stage reads."""
    argv = sys.argv[1:] if argv is None else argv
    init_from = next((a.split("=", 1)[1] for a in argv if a.startswith("--init_from=")), "")
    if not os.path.isfile(os.path.join(init_from, "meta.json")):
        raise SystemExit(f"give --init_from=ROUND_FOLDER, a round folder of a RankE run (got {init_from!r})")
    bad = verify_round(init_from)
    if bad:
        raise SystemExit(f"cannot start from {init_from}: {bad}")
    meta = read_meta(init_from)
    # the run's keys that are not this stage's (the loop's `rounds`, the other stage's) stand, so that the
    # run's config file is accepted; this stage's own come from its file, as ranke.py would run them
    run = {k: v for k, v in meta["config"].items() if k not in DERIVED}
    own = {k: v for m in (sys.modules[__name__], *uses, module) for k, v in defaults(m).items()}
    c = make_config({**run, **own}, argv)
    msg = check(c) or module.check(c)
    if msg:
        raise SystemExit(msg)
    c.prompts_sha1 = file_digest(c.train_prompts, "sha1")
    check_round(c, init_from, os.path.basename(module.__file__), prompts=True)
    if os.path.exists(c.out_dir) and os.listdir(c.out_dir):
        raise SystemExit(f"{c.out_dir} is not empty: choose another out_dir (nothing was overwritten)")
    c.run_id, c.round = meta["run_id"], meta["round"] + 1
    c.t5_cache = t5_cache(c, os.path.dirname(os.path.abspath(init_from)))  # the run's
    return c


def saved_rounds(run):
    """The numbers of run folder `run`'s complete round folders, in order ([] if none)."""
    return sorted(int(x[6:]) for x in os.listdir(run) if x.startswith("round_") and x[6:].isdigit()) \
        if os.path.isdir(run) else []


def saved_round(run, k=-1):
    """Round folder k of run folder `run` (-1: the last saved), or one message naming the rounds it has."""
    saved = saved_rounds(run)
    k = saved[-1] if k == -1 and saved else k
    if k not in saved:
        raise SystemExit(f"{run} has no round {k}: its saved rounds are {saved or 'none'}")
    return round_dir(run, k)


def saved_setting(config, k, modules=()):
    """Key k of a saved round's config; for a round saved before k existed, k's default (common.py's or
    one of `modules`')."""
    if k in config:
        return config[k]
    return next((getattr(m, k) for m in (sys.modules[__name__], *modules) if hasattr(m, k)), None)


def check_round(c, d, script, prompts=False):
    """Round folder d must come from a run of c's models and group size (and, with `prompts`, of its
    training prompts): else one message naming what differs and how to fix it."""
    run = read_meta(d)["config"]
    differ = [f"{k} {saved_setting(run, k)!r}" for k in MODEL_KEYS if saved_setting(run, k) != getattr(c, k)]
    if prompts and run.get("prompts_sha1") != c.prompts_sha1:
        differ.append(f"train_prompts {run.get('train_prompts')!r} (other contents than {c.train_prompts!r})")
    if differ:
        raise SystemExit(f"{d} comes from a run with {', '.join(differ)}: give that run's config file "
                         f"first (python {script} CONFIG ...) or its values")


def standalone_finish(c, metrics, write):
    """`write(folder)` into out_dir.tmp, then the rename: out_dir appears whole or not at all."""
    tmp = c.out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(c.out_dir):
        os.rmdir(c.out_dir)  # empty, checked at the start
    commit_round(tmp, {"round": c.round, "run_id": c.run_id, "config": vars(c), "metrics": metrics})
    print(" | ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


# ---------------------------------------------------------------- DDP


def init_dist(device):
    """(rank, world, device) from torchrun's environment; a single process without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world, device


def barrier(world):
    if world > 1:
        dist.barrier()


def all_reduce_grads(params, world, bucket=2 ** 25):
    """Average gradients over ranks (plain DDP without the wrapper, which would hide the model's
    attributes that the sampler reads), in flat buckets of about `bucket` elements: one all-reduce a
    bucket, and only a bucket's copy of the gradients in memory at a time."""
    if world == 1:
        return
    buckets, size = [[]], 0
    for p in params:
        if p.grad is None:
            continue
        if buckets[-1] and size + p.numel() > bucket:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for group in filter(None, buckets):
        flat = torch.cat([p.grad.flatten() for p in group]).div_(world)
        dist.all_reduce(flat)
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p))


def all_gather(t, world):
    """Concatenate equally shaped tensors of all ranks along dim 0, rank by rank."""
    if world == 1:
        return t
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def mean_stats(stats, world, device):
    """A stage's metrics: each statistic averaged over the steps that report it, then over ranks."""
    m = {k: sum(s[k] for s in stats if k in s) / sum(k in s for s in stats) for k in {k for s in stats for k in s}}
    if world == 1:
        return m
    keys = sorted(m)
    v = torch.tensor([float(m[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(v)
    return dict(zip(keys, (v / world).tolist()))


def rng(*ints):
    """A generator seeded by (seed, round, step, chunk, ...): the same draws on any world size."""
    return torch.Generator().manual_seed(int(hashlib.sha1(repr(ints).encode()).hexdigest()[:15], 16))


def autocast(c):
    """The stages' precision, the same on every device: with dtype bfloat16 (or float16 on CUDA) the
    forward passes run under autocast while the master weights, gradients and optimizer states stay
    fp32; with float32, autocast is off."""
    return torch.autocast(c.device.split(":")[0], getattr(torch, c.dtype), enabled=c.dtype != "float32")


def grad_scaler(c):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler)."""
    return torch.amp.GradScaler(c.device.split(":")[0], enabled=c.dtype == "float16")


def check_dtype(device, dtype):
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"dtype must be 'float32', 'bfloat16' or 'float16', not {dtype!r}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise SystemExit(f"dtype float16 needs a CUDA device (device is {device!r}): use bfloat16 or float32")
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SystemExit("this GPU cannot run bfloat16: use dtype=float16 (with loss scaling) or float32")


def reset_peak_memory(device):
    """Start a stage's memory measurement: CUDA's allocator peak, or on Linux the process's peak RSS
    (VmHWM, which writing 5 to /proc/self/clear_refs resets to the current RSS)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak below is then the process's lifetime peak


def peak_memory_gb(device):
    """The peak since reset_peak_memory: CUDA max allocated, or the CPU process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def check_finite(loss, what, step):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite {what} ({loss.item()}) at step {step}: stopping this stage; "
                                 f"nothing of this round is written")


def largest_weight(params):
    return torch.stack([p.detach().abs().max().float() for p in params]).max().item()  # NaN if any is


def check_weights(params, what, before, growth=10.0):
    """Stop the stage whose weights became non-finite or exploded: the largest more than `growth` times
    what it was at the stage's start (`before`, largest_weight then; a sound round moves it by a few
    percent). Nothing of the round is written, so the last saved round stays the one to resume from."""
    now = largest_weight(params)
    if not math.isfinite(now) or now > growth * before:
        raise FloatingPointError(f"the {what}'s weights {'became non-finite' if not math.isfinite(now) else 'exploded'}"
                                 f" in this stage (largest |w| {before:.4g} -> {now:.4g}): stopping it; nothing of "
                                 "this round is written. Lower its learning rate, or raise its gradient clipping")


def plain_errors():
    """From here on, a bad input (a missing, unreadable or ill-formed file: FileNotFoundError, BadInput)
    ends the script with its one line, which names the file and what to do, not with a traceback."""
    hook = sys.excepthook

    def one_line(kind, e, tb):
        if issubclass(kind, (FileNotFoundError, BadInput)):
            print(f"error: {e}", file=sys.stderr)
        else:
            hook(kind, e, tb)
    sys.excepthook = one_line


# ---------------------------------------------------------------- data


def read_text(path, what="file"):
    """A text file's contents as UTF-8; a missing file or a byte that is not UTF-8 is one error naming the
    file (and the line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}): save the file as UTF-8") from None


def parse_json(path, text, line=None):
    """JSON text from `path` (its line `line`, or the whole file), or one error naming where."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadInput(f"{path}{f':{line}' if line else ''}: not valid JSON ({e})") from None


def read_prompts(path):
    text = read_text(path, "prompt file")
    if path.endswith(".jsonl"):
        rows = [parse_json(path, x, i) for i, x in enumerate(text.split("\n"), 1) if x.strip()]
        prompts = [r.get("prompt", r.get("caption")) if isinstance(r, dict) else None for r in rows]
    elif path.endswith(".json"):  # a list of prompts, or of {"prompt": ...} (the HPSv2 benchmark's style files)
        prompts = parse_json(path, text)
        if not isinstance(prompts, list):
            raise BadInput(f"{path}: a .json prompt file holds a list of prompts")
        prompts = [p.get("prompt") if isinstance(p, dict) else p for p in prompts]
    elif path.endswith((".csv", ".tsv")):
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.endswith(".tsv") else ","))
        col = next((k for k in ("Prompt", "prompt", "caption") if rows and k in rows[0]), None)
        if col is None:
            raise BadInput(f"{path}: no 'Prompt', 'prompt' or 'caption' column")
        prompts = [r[col] for r in rows]
    else:
        prompts = [line.strip() for line in text.split("\n") if line.strip()]  # lines end at \n alone, as Python's files
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise BadInput(f"{path}: empty, or a row without a prompt")
    return prompts


def read_pairs(path, check_images=False):
    """Image-caption pairs from JSONL; image paths are relative to the JSONL's folder. With
    check_images, each image's header is read (cheap), so a file that is no image fails at start."""
    from PIL import Image
    root, pairs = os.path.dirname(os.path.abspath(path)), []
    for i, line in enumerate(read_text(path, "training pairs file").split("\n"), 1):
        if line.strip():
            r = parse_json(path, line, i)
            if not isinstance(r, dict) or "image" not in r or "caption" not in r:
                raise BadInput(f"{path}:{i}: each line needs 'image' and 'caption'")
            img = os.path.join(root, r["image"])
            if not os.path.isfile(img):
                raise FileNotFoundError(f"{path}:{i}: image not found: {img}")
            if check_images:
                try:
                    Image.open(img).close()
                except Exception as e:
                    raise BadInput(f"{path}:{i}: cannot open image {img}: {e}") from None
            pairs.append((img, r["caption"]))
    if not pairs:
        raise BadInput(f"{path}: no pairs")
    return pairs


def load_image(path, size):
    """An image as 3 x size x size in [-1, 1]: short side resized (bicubic), then centre-cropped."""
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot open image {path}: {e}") from None
    s = size / min(img.size)
    img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def fill_caption_cache(c, texts):
    """T5 once for every prompt the run will read (LlamaGen), into c.t5_cache; the ranks then read it."""
    from model_ar import fill_t5_cache
    fill_t5_cache(texts, c.t5_cache, c.t5_path, c.device, getattr(torch, c.t5_dtype), max_length=c.cls_token_num)


def caption_features(prompts, c, max_length):
    """The policy's condition and its mask: LlamaGen's T5 features (padded as c.caption_padding says,
    cached by prompt in the run's folder), or Janus's prompt token ids."""
    if c.backbone == "janus":
        return prompt_ids(prompts, c.gpt_ckpt, max_length, c.janus_template)
    from model_ar import cached_t5_embed
    return cached_t5_embed(prompts, c.t5_cache, c.t5_path, c.device, getattr(torch, c.t5_dtype), max_length,
                           c.caption_padding)


def save_grid(images, path, nrow):
    """B x 3 x H x W in [-1, 1] -> one PNG, nrow images a row (clamp(127.5 x + 128), as LlamaGen)."""
    from PIL import Image
    B, _, H, W = images.shape
    rows = (B + nrow - 1) // nrow
    grid = torch.zeros(3, rows * H, nrow * W, dtype=torch.uint8)
    x = (127.5 * images.float().cpu() + 128).clamp(0, 255).to(torch.uint8)
    for i in range(B):
        grid[:, (i // nrow) * H:(i // nrow + 1) * H, (i % nrow) * W:(i % nrow + 1) * W] = x[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the files of a round


def round_dir(out_dir, k):
    return os.path.join(out_dir, f"round_{k:04d}")


def commit_round(tmp, meta, known=None):
    """Folder tmp (round_NNNN.tmp) made a round: the sha256 of each of its files into meta.json (from
    `known`, {path: sha256} of files it links to, where it can), every file flushed to the disk, then the
    rename. A crash at any moment leaves either the whole round or none of it."""
    known, files = known or {}, {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        twin = next((p for p in known if os.path.exists(p) and os.path.samefile(p, path)), None)
        files[name] = known[twin] if twin else file_digest(path)
        fsync(path)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync(tmp)
    os.replace(tmp, tmp[:-len(".tmp")])
    fsync(os.path.dirname(os.path.abspath(tmp)))


def read_meta(d):
    path = os.path.join(d, "meta.json")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {d} is not a complete round folder") from None
    except ValueError as e:
        raise BadInput(f"cannot read {path} ({e}): a damaged round folder") from None


def verify_round(d, needed=()):
    """'' if round folder d is whole: its meta.json readable, the `needed` files there, and every file its
    meta.json lists with that sha256 (rounds saved before checksums have none to check); else what is wrong."""
    try:
        files = read_meta(d).get("files", {})
    except (FileNotFoundError, BadInput) as e:
        return str(e)
    for name in sorted(set(needed) | set(files)):
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if name in files and file_digest(path) != files[name]:
            shared = " and, a hard link, in the rounds that share it" if os.stat(path).st_nlink > 1 else ""
            return f"{path} is damaged (its sha256 differs from the one meta.json recorded when it was saved{shared})"
    return ""


def encode_once(cache, vq, idx, image):
    """The frozen tokenizer's codes of training pairs `idx` (B x h*w, on the CPU): each pair is encoded the
    first time it is drawn and kept in `cache`, as the encoder and the codebook never change. image(i):
    pair i's image, 3 x H x W on the tokenizer's device."""
    new = sorted({i for i in idx if i not in cache})
    if new:
        with torch.no_grad():
            cache.update(zip(new, vq.encode(torch.stack([image(i) for i in new])).cpu()))
    return torch.stack([cache[i] for i in idx])


def load_round(c, d, decoder="decoder"):
    """Round folder d's policy and its decoder (or its EMA, decoder='ema'), on the base tokenizer's
    encoder and codebook, on c.device."""
    policy = load_policy(c, os.path.join(d, "policy.safetensors")).to(c.device)
    file = "decoder.safetensors" if decoder == "decoder" else "decoder_ema.safetensors"
    vq = load_decoder(load_vq(c.vq_ckpt, c.vq_model), os.path.join(d, file)).to(c.device)
    return policy, vq


def save_model(model, path):
    atomic_save(model.state_dict(), path)


def save_optimizer(opt, path, scaler=None):
    """AdamW state as safetensors (param index . step / exp_avg / exp_avg_sq), so a resumed run
    continues exactly; the hyper-parameters come from the config. float16's loss scaler (its scale and
    growth count) rides in the file's metadata."""
    state = opt.state_dict()["state"]
    meta = {"scaler": json.dumps(scaler.state_dict())} if scaler is not None and scaler.is_enabled() else None
    atomic_save({f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}, path, meta)


def load_optimizer(opt, path, scaler=None):
    """The state save_optimizer wrote; none (a fresh AdamW) where the file is absent: round 0, or a stage
    run alone from it (a resumed run checks its round has every file first: run_folder.needed_files)."""
    if not os.path.isfile(path):
        return
    flat, state = read_state_dict(path), {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd = opt.state_dict()
    sd["state"] = state
    opt.load_state_dict(sd)
    if scaler is not None and scaler.is_enabled():
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            saved = (f.metadata() or {}).get("scaler")
        if saved:
            scaler.load_state_dict(json.loads(saved))

