"""Prepare a dry run of the real LlamaGen-XL path at its real shapes, on a CPU: random weights for every
model, each written in the official file format of the real one, so that the real loading code runs
(`load_gpt`, `load_vq`, `load_t5`, open_clip's `create_model(..., pretrained=file)`) and
`python ranke.py config/dryrun_xl.py` goes through one round end to end -- 256 px images, 16 x 16 =
256 tokens, GPT-XL and VQ-16 at their real sizes. Nothing here is trained: the numbers a dry run gives
say that the plumbing works (shapes, dtypes, memory, time), never how well anything does.

  gpt.pt             {"model": state_dict} of GPT "GPT-XL" (t2i_XL_stage1_256.pt's manifest), every
                     Linear / Embedding weight normal(0, 0.02) -- the output layer too, so the logits
                     are not all zero; --n_layer=N keeps N of the 36 layers (config/dryrun_xl_bf16.py,
                     with gpt_layers=N)
  vq.pt              {"model": state_dict} of VQModel "VQ-16" (vq_ds16_t2i.pt's manifest), default init
  clip_vit_l_14.pt   open_clip "ViT-L-14", random, as a plain state_dict (open_clip's own checkpoint
                     format, what open_clip_pytorch_model.bin holds); load it with force_quick_gelu=True
  t5/                T5EncoderModel with FLAN-T5-XL's width (d_model 2048, so features are B x 120 x 2048)
                     but one layer, 4 heads and a small d_ff, and a word-level tokenizer of the prompts'
                     words, saved with save_pretrained (config.json, model.safetensors, tokenizer files)
  prompts.txt        8 short captions
  pairs.jsonl        {"image": "images/NN.png", "caption": ...} a line, 8 synthetic 256 x 256 PNGs in images/
  READY              written last (JSON: n_layer, parameter counts, file sizes, seconds); if it is there,
                     the folder is reused as it is

With --backbone=janus it writes Janus-Pro-1B's instead (config/dryrun_janus.py), and 384 px images:

  janus/             a transformers folder of JanusForConditionalGeneration at Janus-Pro-1B's shapes
                     (language model 2048 wide, 102,400 text tokens, VQ-16, generation head over 16,384
                     codes; --n_layer=N of its 24 layers, the vision tower cut to one layer since image
                     generation never runs it), every Linear / Embedding normal(0, 0.02), a word-level
                     tokenizer padded to 102,400 entries with DeepSeek's BOS / pad / image-start ids, and
                     the generation config that names them
  clip_vit_l_14.pt, prompts.txt, pairs.jsonl as above

    python data/xl_dryrun/prepare.py --out=out/xl_dryrun [--n_layer=36] [--seed=0] [--backbone=janus]

At the real depth it writes 4.8 GB (gpt.pt 3.1 GB, clip_vit_l_14.pt 1.7 GB, vq.pt 0.3 GB) in about
a minute on 2 CPU cores; one model is in memory at a time (peak RSS about 3.8 GB, with GPT-XL in fp32).
"""
import gc
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE))]
from model_ar import GPT, gpt_config  # noqa: E402
from model_vq import VQ_CONFIGS, VQModel  # noqa: E402

# (shape, colour, background): the captions and what the synthetic images draw
SCENES = [("circle", "red", "blue"), ("square", "green", "white"), ("triangle", "yellow", "black"),
          ("circle", "white", "green"), ("square", "blue", "yellow"), ("triangle", "red", "white"),
          ("circle", "black", "yellow"), ("square", "red", "green")]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (235, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}
SIZE = 256  # 384 for Janus
T5_WIDTH = 2048  # FLAN-T5-XL's d_model: the GPT's caption_dim
CLIP_MODEL = "ViT-L-14"


def caption(scene):
    shape, colour, background = scene
    return f"a {colour} {shape} on a {background} background"


def save_torch(obj, path):
    """torch.save via a temporary file and a rename, so a crash never leaves half a checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def n_params(sd):
    return sum(v.numel() for v in sd.values())


def write_data(out, rng, size=SIZE):
    """prompts.txt, and pairs.jsonl over images/NN.png: each scene's shape at a random place and size."""
    from PIL import Image, ImageDraw
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    prompts = [caption(s) for s in SCENES]
    with open(os.path.join(out, "prompts.txt.tmp"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    os.replace(os.path.join(out, "prompts.txt.tmp"), os.path.join(out, "prompts.txt"))
    with open(os.path.join(out, "pairs.jsonl.tmp"), "w") as f:
        for i, (scene, text) in enumerate(zip(SCENES, prompts)):
            shape, colour, background = scene
            img = Image.new("RGB", (size, size), COLOURS[background])
            r = int(rng.integers(40, 90))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            box = [cx - r, cy - r, cx + r, cy + r]
            draw = ImageDraw.Draw(img)
            if shape == "circle":
                draw.ellipse(box, fill=COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=COLOURS[colour])
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
            noise = rng.normal(0, 6, (size, size, 3))  # a little texture, as photos have
            img = Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))
            path = f"images/{i:02d}.png"
            img.save(os.path.join(out, path))
            f.write(json.dumps({"image": path, "caption": text}) + "\n")
    os.replace(os.path.join(out, "pairs.jsonl.tmp"), os.path.join(out, "pairs.jsonl"))
    return prompts


def small_t5(path, prompts, seed):
    """A T5EncoderModel of FLAN-T5-XL's output width (2048) and gated-GELU feed-forward, but one layer,
    4 heads and d_ff 256; a word-level tokenizer of the prompts' words (lower-cased, as t5_embed feeds
    them), '</s>' appended as T5's tokenizer does. Saved with save_pretrained into `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    split = pre_tokenizers.Whitespace()
    words = sorted({w for p in prompts for w, _ in split.pre_tokenize_str(p.lower().strip())})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=T5_WIDTH, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = T5EncoderModel(cfg)
    model.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return sum(p.numel() for p in model.parameters())


def random_gpt(path, n_layer, seed):
    """GPT-XL (t2i, 256 px) with LlamaGen's init -- normal(0, 0.02) for every Linear and Embedding --
    applied to the output layer as well (which GPT zeros), so the random policy's logits vary.
    Built, saved and freed before anything else is built."""
    torch.manual_seed(seed)
    gpt = GPT(gpt_config("GPT-XL", n_layer=n_layer))
    nn.init.normal_(gpt.output.weight, std=0.02)
    return save_and_free(gpt, path, "model")


def random_vq(path, seed):
    torch.manual_seed(seed)
    return save_and_free(VQModel(VQ_CONFIGS["VQ-16"]), path, "model")


def save_and_free(model, path, key=None):
    """Save the state_dict (under `key`, as the official file has it) and free the model before the
    next one is built; returns the number of numbers saved."""
    sd = model.state_dict()
    save_torch({key: sd} if key else sd, path)
    n = n_params(sd)
    del model, sd
    gc.collect()
    return n


def random_clip(path, seed):
    """open_clip ViT-L-14 with its own random init, saved as a plain state_dict (open_clip's
    load_checkpoint also takes {"state_dict": ...}; a plain one is what the hub files hold)."""
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model(CLIP_MODEL, pretrained=None, force_quick_gelu=True)
    return save_and_free(model, path)


JANUS_IDS = {"bos": 100000, "pad": 100015, "boi": 100016}  # Janus-Pro-1B's generation_config.json


def random_janus(path, prompts, n_layer, seed):
    """transformers' JanusForConditionalGeneration at Janus-Pro-1B's shapes (n_layer of 24), random,
    save_pretrained into `path` with a word-level tokenizer of DeepSeek's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, LlamaConfig, PreTrainedTokenizerFast
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig
    split = pre_tokenizers.Whitespace()
    words = sorted({w for p in prompts for w, _ in split.pre_tokenize_str(p)} | {":"})
    named = {"<bos>": JANUS_IDS["bos"], "<pad>": JANUS_IDS["pad"], "<begin_of_image>": JANUS_IDS["boi"],
             "<unk>": 100002, "<|User|>": 100003, "<|Assistant|>": 100004, **{w: i for i, w in enumerate(words)}}
    vocab = {f"<unused_{i}>": i for i in range(102400)}
    vocab = {**{t: i for t, i in vocab.items() if i not in named.values()}, **named}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = split
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", JANUS_IDS["bos"])])
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
                            additional_special_tokens=["<begin_of_image>", "<|User|>", "<|Assistant|>"]).save_pretrained(tmp)
    cfg = JanusConfig(text_config=LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                                              num_hidden_layers=n_layer, num_attention_heads=16, num_key_value_heads=16,
                                              max_position_embeddings=16384, rms_norm_eps=1e-6, bos_token_id=100000,
                                              eos_token_id=100001, pad_token_id=JANUS_IDS["pad"]).to_dict(),
                      vision_config=JanusVisionConfig(num_hidden_layers=1).to_dict(), vq_config=JanusVQVAEConfig().to_dict())
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
    model.save_pretrained(tmp)
    GenerationConfig(bos_token_id=JANUS_IDS["bos"], pad_token_id=JANUS_IDS["pad"],
                     generation_kwargs={"boi_token_id": JANUS_IDS["boi"]}).save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return n


def prepare(out="out/xl_dryrun", n_layer=36, seed=0, backbone="llamagen"):
    """Write the dry run's files into `out` unless READY says they are there already."""
    ready = os.path.join(out, "READY")
    if os.path.isfile(ready):
        with open(ready) as f:
            have = json.load(f).get("n_layer")
        note = f" (note: it holds a {have}-layer GPT, not {n_layer}; delete {out} to rebuild)" if have != n_layer else ""
        print(f"the XL dry run is prepared already in {out}: reusing it{note}")
        return
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    times, params, t0 = {}, {}, time.time()
    prompts = write_data(out, np.random.default_rng(seed), 384 if backbone == "janus" else SIZE)
    times["data"] = time.time() - t0
    steps = [("clip", lambda: random_clip(os.path.join(out, "clip_vit_l_14.pt"), seed + 3))]
    if backbone == "janus":
        steps.append(("janus", lambda: random_janus(os.path.join(out, "janus"), prompts, n_layer, seed)))
    else:
        steps += [("t5", lambda: small_t5(os.path.join(out, "t5"), prompts, seed + 1)),
                  ("vq", lambda: random_vq(os.path.join(out, "vq.pt"), seed + 2)),
                  ("gpt", lambda: random_gpt(os.path.join(out, "gpt.pt"), n_layer, seed))]
    for name, build in steps:
        t = time.time()
        print(f"writing {name} ...", flush=True)
        params[name] = build()
        times[name] = time.time() - t

    def size(p):
        p = os.path.join(out, p)
        if os.path.isdir(p):
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
        return os.path.getsize(p)

    files = [f for f in ["gpt.pt", "vq.pt", "clip_vit_l_14.pt", "t5", "janus", "images", "prompts.txt", "pairs.jsonl"]
             if os.path.exists(os.path.join(out, f))]
    summary = {"n_layer": n_layer, "seed": seed, "parameters": params,
               "mb": {f: round(size(f) / 2**20, 1) for f in files},
               "seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(time.time() - t0, 1)}
    with open(ready + ".tmp", "w") as f:
        json.dump(summary, f)
    os.replace(ready + ".tmp", ready)
    print(f"prepared the XL dry run in {out} ({time.time() - t0:.0f} s): {json.dumps(summary)}")


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in sys.argv[1:])
    unknown = set(args) - {"out", "n_layer", "seed", "backbone"}
    if unknown:
        raise SystemExit(f"unknown option(s) {sorted(unknown)}: use --out=DIR [--n_layer=N] [--seed=S] [--backbone=janus]")
    prepare(args.get("out", "out/xl_dryrun"), int(args.get("n_layer", 36)), int(args.get("seed", 0)),
            args.get("backbone", "llamagen"))
