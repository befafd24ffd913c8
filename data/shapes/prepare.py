"""The shapes world: its data, and its base models shipped in base/ beside this file.

    python data/shapes/prepare.py [--out=out/shapes]    # the world from the shipped models: seconds
    python data/shapes/prepare.py --train               # train the base models again into base/ (see base/MANIFEST.json)

The base models are trained once (`--train`), committed with the sha256 of each file in
base/MANIFEST.json, and checked against it whenever a world is written, so every machine evaluates
the same base. Each is of the class the real path uses, and is written into the world in the format
the real file comes in:

  vq.pt          VQModel "VQ-micro" (64 x 64 px -> 16 x 16 codes, 512 of them), LlamaGen's {"model": ...}
  t5/            a T5EncoderModel (tiny, random: a frozen text encoder) and a word-level tokenizer
  gpt.pt         GPT "GPT-micro", next-token prediction on the world's codes, captions dropped 10%
  clip.json/.pt  an open_clip CLIP (tiny), contrastive on the world's pairs: the reward
  features.pt    the world's Inception (TorchScript, called as clean-fid calls its own): a network trained
                 on renders to read every object (how many of each kind; which kind covers each cell of an
                 8 x 8 map: colour, shape, size, position), frozen; its features give the FD analogue
  prompts_train.txt, prompts_heldout.txt, specs.json, pairs.jsonl, heldout_pairs.jsonl, images/
  janus/         with --backbone=janus: a tiny Janus-Pro as a transformers folder (JanusForConditionalGeneration),
                 its image-generation path trained like gpt.pt, its VQ the world's vq.pt (trained here, not shipped)
"""
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import world  # noqa: E402
from checkpoint import atomic_save, atomic_write, file_digest, read_state_dict  # noqa: E402
from model_ar import GPT, cached_t5_embed, gpt_config  # noqa: E402
from model_janus import export_janus, load_janus, prompt_ids  # noqa: E402
from model_vq import VQ_CONFIGS, VQModel, load_vq  # noqa: E402

BASE = os.path.join(HERE, "base")
CLIP_CONFIG = {"embed_dim": 64, "quick_gelu": False,
               "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
STEPS = {"vq": 2000, "gpt": 12000, "clip": 600, "features": 1500, "janus": 1500}
JANUS_PROMPT_LEN = 24  # BOS, the template's 4 tokens, up to 8 words, the image-start token
RENDERS_PER_PROMPT = 32  # the GPT's training set: this many renders of each training prompt, encoded once
SHIPPED = ["vq.safetensors", "gpt.safetensors", "clip.json", "clip.safetensors", "features.safetensors",
           "t5/config.json", "t5/model.safetensors", "t5/tokenizer.json",
           "t5/tokenizer_config.json"]


def images_of(specs, rng):
    """Render specs -> B x 3 x 64 x 64 in [-1, 1]."""
    x = np.stack([world.render(s, rng) for s in specs])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step, total, lr):
    return lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))


def bar(it, desc):
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False)


def train_vq(train, steps, rng):
    """The tokenizer's losses (L1 + L2 reconstruction, codebook, commitment 0.25) with the
    straight-through estimator. Through the first 60% of training, codes unused for 25 steps restart at
    latents of the batch (without it most of the codebook dies and the world is drawn with a few dozen)."""
    torch.manual_seed(0)
    vq = VQModel(VQ_CONFIGS["VQ-micro"])
    opt = torch.optim.Adam(vq.parameters(), 2e-3, betas=(0.5, 0.9))
    usage = torch.zeros(vq.config.codebook_size)
    for step in bar(range(steps), "VQ tokenizer"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3)
        x = images_of(rng.choices(train, k=16), rng)
        z = F.normalize(vq.encode_latent(x).permute(0, 2, 3, 1), dim=-1)  # B h w D on the sphere
        flat = z.reshape(-1, z.shape[-1])
        codes = vq.quantize.nearest(flat).view(z.shape[:3])
        usage += torch.bincount(codes.flatten(), minlength=len(usage))
        if step % 25 == 24 and step < 0.6 * steps:
            dead = (usage == 0).nonzero().flatten()
            with torch.no_grad():
                vq.quantize.embedding.weight[dead] = flat[torch.randint(len(flat), (len(dead),))].detach()
            usage.zero_()
        e = vq.quantize.codebook()[codes]
        zq = z + (e - z).detach()  # straight-through
        rec = vq.decode_latent(zq.permute(0, 3, 1, 2))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + F.mse_loss(e, z.detach()) + 0.25 * F.mse_loss(z, e.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vq.eval(), loss.item()


def tiny_t5(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(world.WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    T5EncoderModel(cfg).save_pretrained(path)


def train_gpt(vq, train, cache, t5_path, steps, rng, renders, gpt=None, cond=None, mask=None):
    """Next-token prediction on the codes of `renders` renders of each training prompt (encoded
    once), 10% of captions replaced by the null caption so that CFG works (as LlamaGen trains). A
    given policy (Janus) is trained the same way on its own prompt encoding (cond, mask)."""
    torch.manual_seed(0)
    if gpt is None:
        gpt = GPT(gpt_config("GPT-micro"))
        cond, mask = cached_t5_embed([s["prompt"] for s in train], cache, t5_path, max_length=gpt.config.cls_token_num)
    ids = torch.arange(len(train)).repeat(renders)
    with torch.no_grad():
        codes = torch.cat([vq.encode(images_of([train[i] for i in ids[k:k + 256]], rng)) for k in range(0, len(ids), 256)])
    opt = torch.optim.AdamW(gpt.parameters(), 2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    fast = isinstance(gpt, GPT)  # transformers' Janus stays eager in fp32: compiled, its steps took a minute each

    def loss_of(b, uncond):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            logits = gpt(codes[b], cond[ids[b]], mask[ids[b]], uncond=uncond)
        return F.cross_entropy(logits.float().flatten(0, 1), codes[b].flatten())
    if fast:  # bf16 autocast and compiled: 1.6x the steps a second on 2 CPU cores (AMX, fused elementwise ops)
        loss_of = torch.compile(loss_of)
    for step in bar(range(steps), f"policy ({type(gpt).__name__})"):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        b = torch.randint(len(ids), (64,), generator=g)
        loss = loss_of(b, torch.rand(64, generator=g) < 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
    return gpt.eval(), loss.item()


def train_clip(folder, train, steps, rng):
    """A tiny open_clip CLIP, contrastive on the world's pairs; half of each batch are hard negatives of
    the other half (the same objects in another relation or size), or it learns the objects and not
    where they are."""
    import open_clip
    open_clip.add_model_config(os.path.join(folder, "clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("clip")
    tok = open_clip.get_tokenizer("clip")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.1)
    by_objects = {}
    for s in train:
        by_objects.setdefault(frozenset(map(tuple, s["objects"])), []).append(s)
    for step in bar(range(steps), "CLIP reward"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3)
        specs = rng.sample(train, 64)
        seen = {s["prompt"] for s in specs}
        for s in list(specs[:32]):
            options = [o for o in by_objects[frozenset(map(tuple, s["objects"]))] if o["prompt"] not in seen]
            if options:
                specs.append(rng.choice(options))
                seen.add(specs[-1]["prompt"])
        x = ((images_of(specs, rng) + 1) / 2 - mean) / std
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(model.encode_text(tok([s["prompt"] for s in specs])), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.t()
        labels = torch.arange(len(specs))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


N_MAP = world.MAP_CELLS ** 2 * (1 + len(world.OBJECTS))


class Features(nn.Module):
    """The world's Inception: a small CNN trained on renders to read every object through linear heads
    -- the count (0, 1, 2) of each of the 15 kinds of object, and with n_map the kind covering each cell
    of an 8 x 8 map (so colour, shape, size and position of every object). Its features, as Inception's
    pool features are, average each ReLU map over the image: the six maps together (544-d) see both the
    fine texture a decoder renders (the first maps) and what the objects are (the last). forward(x in
    [0, 255], return_features) follows clean-fid's TorchScript Inception call."""
    def __init__(self):
        super().__init__()
        conv = lambda a, b, s: [nn.Conv2d(a, b, 3, s, 1), nn.ReLU()]
        self.net = nn.Sequential(*conv(3, 32, 1), *conv(32, 64, 2), *conv(64, 64, 1), *conv(64, 128, 2),
                                 *conv(128, 128, 2), *conv(128, 128, 2), nn.Flatten(), nn.Linear(128 * 16, 128))
        self.head = nn.Linear(128, len(world.OBJECTS) * 3 + N_MAP)

    def forward(self, x, return_features: bool = True):
        h, pooled = x / 127.5 - 1, []
        for layer in self.net:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                pooled.append(h.mean((2, 3)))
        return torch.cat(pooled, 1) if return_features else self.head(F.relu(h))


def read_loss(net, x, specs, maps):
    """Cross-entropy of the counts (the rare counts of one and two weigh 5x the absent) and of the map."""
    out = net((x + 1) * 127.5, False)
    k = len(world.OBJECTS) * 3
    y = torch.tensor([world.labels(s) for s in specs])
    return F.cross_entropy(out[:, :k].reshape(-1, 3), y.flatten(), weight=torch.tensor([1.0, 5.0, 5.0])) + \
        F.cross_entropy(out[:, k:].reshape(-1, 1 + len(world.OBJECTS)), maps.flatten())


def train_features(train, steps, rng):
    """The feature network, on renders: the counts and the object map. Batches weight the prompt kinds
    1 : 1 : 4 (single : two of a kind : pair), or the rare counts of two are never learned."""
    torch.manual_seed(0)
    net = Features()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    by_kind = [[s for s in train if s["kind"] == k] for k in ("single", "two", "pair")]
    for step in bar(range(steps), "feature network"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3)
        specs = [rng.choice(by_kind[min(k % 6, 2)]) for k in range(64)]
        layouts = [world.layout(s, rng) for s in specs]
        x = torch.from_numpy(np.stack([world.draw(o) for o in layouts])).permute(0, 3, 1, 2).float() / 127.5 - 1
        loss = read_loss(net, x, specs, torch.from_numpy(np.stack([world.object_map(o) for o in layouts])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval(), loss.item()


def load_features(path):
    net = Features()
    net.load_state_dict(read_state_dict(path))
    return net.eval()


def save_pairs(specs, rng, out, name, copies):
    from PIL import Image
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, name + ".tmp"), "w") as f:
        for k in range(copies):
            for i, s in enumerate(specs):
                path = f"images/{name.split('.')[0]}_{k}_{i}.png"
                Image.fromarray(world.render(s, rng)).save(os.path.join(out, path))
                f.write(json.dumps({"image": path, "caption": s["prompt"]}) + "\n")
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def janus_base(path, words, image_size=64, dim=96, n_layer=3, seed=0, std=None):
    """A random transformers Janus-Pro of the world's sizes, saved as its converted checkpoint is: config,
    weights, a word-level tokenizer with Janus's special tokens, and the generation config that names
    them. The VQ has VQ-micro's shapes (4x down: image_size / 4 squared codes); the vision tower, which
    image generation never runs, is the smallest that fits. std: weight matrices N(0, std), embeddings
    N(0, 1), biases 0 instead of transformers' initialisation (the tests' random models, whose greedy
    tokens must depend on the prompt and the position)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig, PreTrainedTokenizerFast
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
    special = ["<pad>", "<bos>", "<unk>", "<begin_of_image>", "<|User|>", "<|Assistant|>"]
    vocab = {t: i for i, t in enumerate(special + [":"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
                            additional_special_tokens=special[3:]).save_pretrained(path)
    vq = VQ_CONFIGS["VQ-micro"]
    cfg = JanusConfig(
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=dim, intermediate_size=256, num_hidden_layers=n_layer,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=1).to_dict(),
        vision_config=JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
                                        patch_size=4, projection_dim=dim, mlp_ratio=2.0,
                                        num_image_tokens=(image_size // 4) ** 2).to_dict(),
        vq_config=JanusVQVAEConfig(embed_dim=vq.codebook_embed_dim, num_embeddings=vq.codebook_size,
                                   base_channels=vq.ch, channel_multiplier=list(vq.ch_mult),
                                   num_res_blocks=vq.num_res_blocks, latent_channels=vq.z_channels,
                                   projection_dim=dim, num_hidden_layers=2, image_token_embed_dim=dim).to_dict(),
        image_token_id=2)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg)
    if std is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" not in n:
                    p.zero_() if n.endswith("bias") else p.normal_(0, 1.0 if "embed" in n else std)
    model.save_pretrained(path)
    GenerationConfig(bos_token_id=1, pad_token_id=0, generation_kwargs={"boi_token_id": 3}).save_pretrained(path)


def prepare_janus(out, steps, seed, renders):
    """out/janus: a tiny Janus-Pro whose image-generation path learns the world's codes as gpt.pt does,
    with the world's VQ as its tokenizer, as a transformers folder."""
    folder, base = os.path.join(out, "janus"), os.path.join(out, "janus_base.tmp")
    train, _ = world.split(seed)
    rng = random.Random(seed + 1)
    janus_base(base, world.WORDS)
    policy = load_janus(base, base, JANUS_PROMPT_LEN)
    ids, mask = prompt_ids([s["prompt"] for s in train], base, JANUS_PROMPT_LEN)
    vq = load_vq(os.path.join(out, "vq.pt"), "VQ-micro")
    policy, loss = train_gpt(vq, train, None, None, steps, rng, renders, policy, ids, mask)
    export_janus(policy, vq, base, folder + ".tmp")
    shutil.rmtree(base)
    os.replace(folder + ".tmp", folder)
    return loss


# ---------------------------------------------------------------- the shipped base models


def train_base(base=BASE, steps=None, seed=0, only=None):
    """Train the base models (all, or those named in `only`; the others are read from base/) and write
    them with MANIFEST.json: each file's sha256, the steps, final losses and seconds."""
    steps = {**STEPS, **(steps or {})}
    os.makedirs(os.path.join(base, "t5"), exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest_path = os.path.join(base, "MANIFEST.json")
    manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    log = manifest.get("training", {})
    train, _ = world.split(seed)
    todo = only or ["t5", "vq", "gpt", "clip", "features"]
    def timed(name, fn):
        t0 = time.time()
        loss = fn()
        log[name] = {"steps": steps.get(name), "final_loss": loss, "seconds": round(time.time() - t0, 1)}
        print(f"{name}: {log[name]}", flush=True)
    rng = lambda k: random.Random(1000 * seed + k)  # each model its own draws: retraining one leaves the rest
    if "t5" in todo:
        timed("t5", lambda: tiny_t5(os.path.join(base, "t5")))
    def saved(name, train_fn):  # train, write base/<name>.safetensors, give the final loss
        model, loss = train_fn()
        atomic_save(model.state_dict(), os.path.join(base, f"{name}.safetensors"))
        return loss
    if "vq" in todo:
        timed("vq", lambda: saved("vq", lambda: train_vq(train, steps["vq"], rng(0))))
    vq = load_vq(os.path.join(base, "vq.safetensors"), "VQ-micro")
    if "gpt" in todo:
        def gpt_job():
            cache = os.path.join(base, "t5_cache.tmp.safetensors")
            gpt, loss = train_gpt(vq, train, cache, os.path.join(base, "t5"), steps["gpt"], rng(2), RENDERS_PER_PROMPT)
            os.remove(cache)
            atomic_save(gpt.state_dict(), os.path.join(base, "gpt.safetensors"))
            return loss
        timed("gpt", gpt_job)
    if "clip" in todo:
        atomic_write(os.path.join(base, "clip.json"), json.dumps(CLIP_CONFIG))
        timed("clip", lambda: saved("clip", lambda: train_clip(base, train, steps["clip"], rng(3))))
    if "features" in todo:
        timed("features", lambda: saved("features", lambda: train_features(train, steps["features"], rng(4))))
    manifest = {"files": {f: file_digest(os.path.join(base, f)) for f in SHIPPED if os.path.isfile(os.path.join(base, f))},
                "training": log,
                "torch": torch.__version__}
    atomic_write(manifest_path, json.dumps(manifest, indent=1) + "\n")


def check_base(base=BASE):
    """The shipped files, each against its sha256 in MANIFEST.json; returns the manifest's own sha256."""
    path = os.path.join(base, "MANIFEST.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: the shapes world's base models are missing from this checkout "
                         f"(train them with python data/shapes/prepare.py --train)")
    files = json.load(open(path))["files"]
    for name, digest in files.items():
        f = os.path.join(base, name)
        if not os.path.isfile(f) or file_digest(f) != digest:
            raise SystemExit(f"{f} is missing or differs from its sha256 in {path}: restore it from the "
                             f"repository (git checkout -- {os.path.relpath(f)}) or retrain with --train")
    return file_digest(path)


def write_world(out="out/shapes", base=BASE, seed=0):
    """The world in `out` from the shipped base models: the data (deterministic renders) and the models
    in their official formats. Done once; READY names the manifest it was written from, so a checkout
    with other base models writes the world again."""
    stamp = check_base(base)
    if written_from(out, stamp):
        return False
    t0 = time.time()
    # a folder of this call's own, so that runs started together (a study's, two at a time) each write whole
    # worlds; the first to finish publishes its world and the others keep it
    out = out.rstrip("/")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        fill_world(tmp, base, seed, stamp, t0)
        if written_from(out, stamp):
            return False  # another run wrote it meanwhile
        shutil.rmtree(out, ignore_errors=True)  # a world of other base models
        try:
            os.rename(tmp, out)
        except OSError:  # another run published its world in the moment between
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def written_from(out, stamp):
    """Whether `out` holds a whole world written from the base models of manifest digest `stamp`."""
    ready = os.path.join(out, "READY")
    return os.path.isfile(ready) and json.load(open(ready)).get("manifest_sha256") == stamp


def fill_world(tmp, base, seed, stamp, t0):
    """write_world's files, into the folder tmp."""
    train, held = world.split(seed)
    rng = random.Random(seed)
    with open(os.path.join(tmp, "prompts_train.txt"), "w") as f:
        f.write("\n".join(s["prompt"] for s in train) + "\n")
    with open(os.path.join(tmp, "prompts_heldout.txt"), "w") as f:
        f.write("\n".join(s["prompt"] for s in held) + "\n")
    with open(os.path.join(tmp, "specs.json"), "w") as f:
        json.dump({s["prompt"]: s for s in world.all_specs()}, f)
    save_pairs(train, rng, tmp, "pairs.jsonl", 1)  # real images for Stage 2
    save_pairs(held, rng, tmp, "heldout_pairs.jsonl", 8)  # real images of held-out prompts for eval
    shutil.copytree(os.path.join(base, "t5"), os.path.join(tmp, "t5"))
    shutil.copy(os.path.join(base, "clip.json"), os.path.join(tmp, "clip.json"))
    torch.save({"model": read_state_dict(os.path.join(base, "vq.safetensors"))}, os.path.join(tmp, "vq.pt"))
    torch.save({"model": read_state_dict(os.path.join(base, "gpt.safetensors"))}, os.path.join(tmp, "gpt.pt"))
    torch.save({"state_dict": read_state_dict(os.path.join(base, "clip.safetensors"))}, os.path.join(tmp, "clip.pt"))
    net = load_features(os.path.join(base, "features.safetensors"))
    torch.jit.save(torch.jit.script(net), os.path.join(tmp, "features.pt"))
    with open(os.path.join(tmp, "READY"), "w") as f:
        json.dump({"manifest_sha256": stamp, "seconds": round(time.time() - t0, 1)}, f)


def prepare(out="out/shapes", seed=0, backbone="llamagen"):
    """The world in `out` (written from base/ unless it is there already), and with backbone="janus"
    its Janus (janus/, trained on the world's codes)."""
    t0 = time.time()
    if write_world(out, BASE, seed):
        print(f"wrote the shapes world into {out} from {os.path.relpath(BASE)} ({time.time() - t0:.0f} s)")
    if backbone == "janus" and not os.path.isdir(os.path.join(out, "janus")):
        t0 = time.time()
        loss = prepare_janus(out, STEPS["janus"], seed, RENDERS_PER_PROMPT)
        print(f"prepared its Janus in {out}/janus ({time.time() - t0:.0f} s): loss {loss:.3f}")


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
    if args.get("train"):
        only = args["only"].split(",") if "only" in args else None
        train_base(only=only)
    prepare(args.get("out", "out/shapes"), backbone=args.get("backbone", "llamagen"))
