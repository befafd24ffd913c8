"""Prepare the shapes world: its data and its base models, each of the same class as the real path,
pretrained here on 2 CPU cores in a few minutes, and saved in the formats the real files come in.

  vq.pt          VQModel "VQ-micro" (32 x 32 px -> 8 x 8 codes), reconstruction + codebook + commitment
  t5/            T5EncoderModel (tiny, random: a frozen text encoder) and a word-level tokenizer
  gpt.pt         GPT "GPT-micro", next-token prediction on the world's codes, captions dropped 10%
  clip.json/.pt  an open_clip CLIP (tiny), contrastive on the world's pairs: the reward
  features.pt    an independent network (TorchScript, the Inception of the world) trained to count
                 the objects in an image: its features give the FD analogue
  reader.pt      micro GenEval's detector: the same network trained to count the objects of renders and
                 of their reconstructions by vq.pt (the rule detector world.detect reads renders only)
  prompts_train.txt, prompts_heldout.txt, specs.json, pairs.jsonl, heldout_pairs.jsonl, images/
  janus/         with --backbone=janus: a tiny Janus-Pro as a transformers folder (JanusForConditionalGeneration),
                 its image-generation path trained like gpt.pt, its VQ the world's vq.pt, a word-level tokenizer

    python data/shapes/prepare.py [--out=out/shapes] [--quick] [--backbone=janus]
"""
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import world  # noqa: E402
from model_ar import GPT, cached_t5_embed, gpt_config  # noqa: E402
from model_janus import export_janus, load_janus, prompt_ids  # noqa: E402
from model_vq import VQ_CONFIGS, VQModel, load_vq  # noqa: E402

CLIP_CONFIG = {"embed_dim": 64, "quick_gelu": False,
               "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
STEPS = {"vq": 300, "gpt": 400, "clip": 150, "features": 200, "reader": 1500, "janus": 400}
JANUS_PROMPT_LEN = 24  # BOS, the template's 4 tokens, up to 8 words, the image-start token
RENDERS_PER_PROMPT = 6  # the GPT's training set: this many renders of each training prompt, encoded once


def images_of(specs, rng):
    """Render specs -> B x 3 x 32 x 32 in [-1, 1]."""
    x = np.stack([world.render(s, rng) for s in specs])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step, total, lr):
    return lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / total))


def bar(it, desc):
    from tqdm import tqdm
    return tqdm(it, desc=desc, leave=False)


def train_vq(train, steps, rng):
    """The tokenizer's losses (L1 + L2 reconstruction, codebook, commitment 0.25) with the
    straight-through estimator. For the first 80 steps, codes unused for 20 steps restart at latents
    of the batch (without it most of the codebook dies and the world is drawn with a dozen codes)."""
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
        if step % 20 == 19 and step < 80:
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
    return vq.eval()


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
    opt = torch.optim.AdamW(gpt.parameters(), 3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    for step in bar(range(steps), f"policy ({type(gpt).__name__})"):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 3e-3)
        b = torch.randint(len(ids), (64,), generator=g)
        logits = gpt(codes[b], cond[ids[b]], mask[ids[b]], uncond=torch.rand(64, generator=g) < 0.1)
        loss = F.cross_entropy(logits.flatten(0, 1), codes[b].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        opt.step()
    return gpt.eval(), loss.item()


def train_clip(out, train, steps, rng):
    import open_clip
    with open(os.path.join(out, "clip.json"), "w") as f:
        json.dump(CLIP_CONFIG, f)
    open_clip.add_model_config(os.path.join(out, "clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("clip")
    tok = open_clip.get_tokenizer("clip")
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.1)
    for step in bar(range(steps), "CLIP reward"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 1e-3)
        # distinct prompts in a batch, so each image has one right caption
        specs = rng.sample(train, 96)
        x = ((images_of(specs, rng) + 1) / 2 - mean) / std
        fi = F.normalize(model.encode_image(x), dim=-1)
        ft = F.normalize(model.encode_text(tok([s["prompt"] for s in specs])), dim=-1)
        logits = model.logit_scale.exp() * fi @ ft.t()
        labels = torch.arange(len(specs))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.save({"state_dict": model.state_dict()}, os.path.join(out, "clip.pt"))
    return loss.item()


class Features(nn.Module):
    """The world's Inception: a small CNN trained to count each of the 15 kinds of object (0, 1, 2);
    its pooled features give the FD analogue. forward(x in [0, 255], return_features) follows
    clean-fid's TorchScript Inception call. The same network reads micro GenEval's counts (reader.pt)."""
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                                 nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, len(world.OBJECTS) * 3)

    def forward(self, x, return_features: bool = True):
        f = self.net(x / 127.5 - 1)
        return f if return_features else self.head(f)


def train_features(train, steps, rng):
    torch.manual_seed(0)
    net = Features()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    for step in bar(range(steps), "feature network"):
        specs = rng.choices(train, k=64)
        x = (images_of(specs, rng) + 1) * 127.5
        y = torch.tensor([world.labels(s) for s in specs])
        loss = F.cross_entropy(net(x, False).view(-1, 3), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def train_reader(vq, train, steps, rng):
    """Micro GenEval's detector: per-object counts (0, 1, 2) of renders and, for half of each batch, of
    their reconstructions by the world's tokenizer, so that it reads decoded images as well as real ones.
    Batches weight the prompt kinds 1 : 1 : 4 (single : two of a kind : pair) and the counts 1 : 5 : 5,
    or the rare counts of two and the varied pairs are never learned."""
    torch.manual_seed(0)
    net = Features()
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    by_kind = [[s for s in train if s["kind"] == k] for k in ("single", "two", "pair")]
    for step in bar(range(steps), "micro GenEval reader"):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3)
        specs = [rng.choice(by_kind[min(k % 6, 2)]) for k in range(64)]
        x = images_of(specs, rng)
        with torch.no_grad():
            x[32:] = vq.decode(vq.encode(x[32:])).clamp(-1, 1)
        y = torch.tensor([world.labels(s) for s in specs])
        loss = F.cross_entropy(net((x + 1) * 127.5, False).view(-1, 3), y.flatten(), weight=torch.tensor([1.0, 5.0, 5.0]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
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


def janus_base(path, words, image_size=32, dim=96, n_layer=3, seed=0, std=None):
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
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
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


def prepare(out="out/shapes", quick=False, seed=0, steps=None, backbone="llamagen"):
    """Build the world in `out` unless it is there already (READY marks a complete preparation), and
    with backbone="janus" its Janus (janus/, added to a prepared world). quick: 4 steps of each model
    (the CI smoke world); steps: per-model overrides of STEPS."""
    steps = {**{k: (4 if quick else v) for k, v in STEPS.items()}, **(steps or {})}
    if os.path.isfile(os.path.join(out, "READY")):
        print(f"the shapes world is prepared already in {out}: reusing it")
        if not os.path.isfile(os.path.join(out, "reader.pt")):  # a world prepared before the reader existed
            t0 = time.time()
            train = world.split(seed)[0]
            reader = train_reader(load_vq(os.path.join(out, "vq.pt"), "VQ-micro"), train, steps["reader"], random.Random(seed + 2))
            torch.jit.save(torch.jit.script(reader), os.path.join(out, "reader.pt"))
            print(f"added micro GenEval's reader to {out} ({time.time() - t0:.0f} s)")
        if backbone == "janus" and not os.path.isdir(os.path.join(out, "janus")):
            t0 = time.time()
            loss = prepare_janus(out, steps["janus"], seed, 1 if quick else RENDERS_PER_PROMPT)
            print(f"prepared its Janus in {out}/janus ({time.time() - t0:.0f} s): loss {loss:.3f}")
        return
    os.makedirs(out, exist_ok=True)
    times, t0 = {}, time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train, held = world.split(seed)
    rng = random.Random(seed)
    with open(os.path.join(out, "prompts_train.txt"), "w") as f:
        f.write("\n".join(s["prompt"] for s in train) + "\n")
    with open(os.path.join(out, "prompts_heldout.txt"), "w") as f:
        f.write("\n".join(s["prompt"] for s in held) + "\n")
    with open(os.path.join(out, "specs.json"), "w") as f:
        json.dump({s["prompt"]: s for s in world.all_specs()}, f)
    save_pairs(train, rng, out, "pairs.jsonl", 1)  # real images for Stage 2
    save_pairs(held, rng, out, "heldout_pairs.jsonl", 4)  # real images of held-out prompts for eval
    times["data"] = time.time() - t0
    t = time.time()
    tiny_t5(os.path.join(out, "t5"))
    vq = train_vq(train, steps["vq"], rng)
    torch.save({"model": vq.state_dict()}, os.path.join(out, "vq.pt"))
    times["vq"] = time.time() - t
    t = time.time()
    gpt, gpt_loss = train_gpt(vq, train, os.path.join(out, "t5_cache.safetensors"), os.path.join(out, "t5"),
                              steps["gpt"], rng, 1 if quick else RENDERS_PER_PROMPT)
    torch.save({"model": gpt.state_dict()}, os.path.join(out, "gpt.pt"))
    times["gpt"] = time.time() - t
    t = time.time()
    clip_loss = train_clip(out, train, steps["clip"], rng)
    times["clip"] = time.time() - t
    t = time.time()
    torch.jit.save(torch.jit.script(train_features(train, steps["features"], rng)), os.path.join(out, "features.pt"))
    times["features"] = time.time() - t
    t = time.time()
    torch.jit.save(torch.jit.script(train_reader(vq, train, steps["reader"], rng)), os.path.join(out, "reader.pt"))
    times["reader"] = time.time() - t
    with torch.no_grad():
        x = images_of(rng.choices(train, k=64), rng)
        rec = F.l1_loss(vq.decode(vq.encode(x)), x).item()
    summary = {"seconds": {k: round(v, 1) for k, v in times.items()}, "vq_l1": rec, "gpt_loss": gpt_loss,
               "clip_loss": clip_loss, "quick": quick, "steps": steps}
    with open(os.path.join(out, "READY"), "w") as f:
        json.dump(summary, f)
    print(f"prepared the shapes world in {out} ({time.time() - t0:.0f} s): {json.dumps(summary)}")
    if backbone == "janus":
        prepare(out, quick, seed, steps, backbone)


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
    prepare(args.get("out", "out/shapes"), bool(args.get("quick", False)), backbone=args.get("backbone", "llamagen"))
