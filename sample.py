"""Images from a round of a run (or from the base checkpoints) for prompts of one's own (nanoGPT's sample.py).

    python sample.py --run=out/ranke --prompt="a red circle above a blue square" --prompt="two green triangles"
    python sample.py config/llamagen_xl_clip.py --run=out/llamagen_xl_clip --round=600 --prompts=mine.txt --n=4
    torchrun --nproc_per_node=8 sample.py config/llamagen_xl_clip.py --run=out/llamagen_xl_clip --prompts=parti.txt
    python sample.py config/llamagen_xl_clip.py --base=True --prompt="..."   # gpt_ckpt and vq_ckpt as they are

Give the run's config file as the run was given it (its models, and the sampler's settings unless
overridden here); the round's meta.json must agree on the models. Writes one PNG per image,
OUT/NNNNN_J.png (prompt N, sample J), and on rank 0 OUT/grid.png: a row per prompt with the prompt
written beside it (the first `grid_rows` prompts). Sample J of prompt N is drawn from the seed
(seed, N, J), whatever the world size.
"""
import os
import sys

import torch

import common
import ranke
from common import caption_features, init_dist, load_policy, read_prompts
from configurator import defaults
from model_ar import clean_caption, generate
from model_janus import prompt_ids
from model_vq import load_vq

# -- config: what to sample; the sampler's settings (cfg_scale, temperature, top_k, top_p, seed) and the
#    models are the run's, from its config file --
run = "out/ranke"  # a run folder (round_NNNN inside)
round = -1  # the round to sample; -1 = the last saved one
base = False  # the base checkpoints (gpt_ckpt, vq_ckpt) instead of a run's round
prompt = ""  # a prompt; --prompt= may be given several times
prompts = ""  # or a prompt file (.txt a line, .csv / .tsv with a Prompt column, .jsonl, .json list)
n = 4  # samples per prompt
decoder = "decoder"  # the round's 'decoder' or its 'ema'
batch = 32  # prompts x samples per forward
out = ""  # default: RUN/samples_round_NNNN (or out/samples_base)
grid_rows = 16


def resolve(c):
    """The round folder to sample (None for the base checkpoints) and the output folder."""
    if c.base:
        return None, c.out or "out/samples_base"
    d = common.saved_round(c.run, c.round)
    common.check_round(c, d, "sample.py")
    return d, c.out or os.path.join(c.run, "samples_" + os.path.basename(d))


def grid_with_prompts(images, texts, n, path):
    """A row of n images per prompt, the prompt written in a panel on its left (images B x 3 x H x W in [-1, 1])."""
    from PIL import Image, ImageDraw
    H, W = images.shape[-2:]
    x = (127.5 * images.float() + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    panel = max(3 * W, 240)
    grid = Image.new("RGB", (panel + n * W, len(texts) * H), "white")
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(texts):
        lines = [""]
        for w in text.split():  # wrapped to the panel, about 6 px a character
            if lines[-1] and (len(lines[-1]) + 1 + len(w)) * 6 > panel - 8:
                lines.append(w)
            else:
                lines[-1] = f"{lines[-1]} {w}".strip()
        draw.multiline_text((4, i * H + 4), "\n".join(lines[:max(1, H // 12)]), fill="black")
        for j in range(n):
            grid.paste(Image.fromarray(x[i * n + j]), (panel + j * W, i * H))
    grid.save(path + ".tmp.png")
    os.replace(path + ".tmp.png", path)


def check_lengths(c, texts):
    """Every prompt must fit the caption slots: T5's tokenizer (or Janus's template) would cut it silently."""
    if c.backbone == "janus":
        try:
            prompt_ids(texts, c.gpt_ckpt, c.cls_token_num, c.janus_template)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    elif os.path.isdir(c.t5_path):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(c.t5_path, local_files_only=True)
        long = [t for t in texts if len(tokenizer(clean_caption(t)).input_ids) > c.cls_token_num]
        if long:
            raise SystemExit(f"{len(long)} prompt(s) longer than the {c.cls_token_num} caption slots, which T5 would "
                             f"cut: {long[0][:80]!r}; shorten them")


@torch.no_grad()
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--prompt=")]  # repeatable
    c = common.make_config({**ranke.settings(), **defaults(sys.modules[__name__])},
                           [a for a in argv if not a.startswith("--prompt=")])
    texts = given or ([c.prompt] if c.prompt else []) or (read_prompts(c.prompts) if c.prompts else [])
    if not texts or any(not t.strip() for t in texts):
        raise SystemExit("give --prompt=TEXT (one or more) or --prompts=FILE, none of them empty")
    if c.decoder not in ("decoder", "ema"):
        raise SystemExit(f"decoder must be 'decoder' or 'ema', not {c.decoder!r}")
    rank, world, c.device = init_dist(c.device)
    d, out = resolve(c)
    check_lengths(c, texts)
    c.t5_cache = common.t5_cache(c, c.run if d else out)  # a run's cache: its prompts are in it
    if d:
        policy, vq = common.load_round(c, d, c.decoder)
    else:
        policy, vq = load_policy(c, c.gpt_ckpt).to(c.device), load_vq(c.vq_ckpt, c.vq_model).to(c.device)
    policy.eval()
    vq.eval()
    os.makedirs(out, exist_ok=True)
    if rank == 0 and c.backbone == "llamagen":  # T5 once for every prompt, into the cache the ranks read
        common.fill_caption_cache(c, texts)
    common.barrier(world)
    jobs = [(i, j) for i in range(rank, len(texts), world) for j in range(c.n)]  # prompt i's samples on rank i % world
    for b in range(0, len(jobs), c.batch):
        part = jobs[b:b + c.batch]
        cond, mask = (t.to(c.device) for t in caption_features([texts[i] for i, _ in part], c, policy.config.cls_token_num))
        gens = [torch.Generator(c.device).manual_seed(common.rng(c.seed, i, j).initial_seed()) for i, j in part]
        with common.autocast(c):
            images = vq.decode(generate(policy, cond, mask, c.cfg_scale, c.temperature, c.top_k, c.top_p, generator=gens))
        policy.free_cache()
        for (i, j), image in zip(part, images.clamp(-1, 1)):
            common.save_grid(image[None], os.path.join(out, f"{i:05d}_{j}.png"), 1)
    common.barrier(world)
    if rank == 0:
        rows = texts[:c.grid_rows]
        images = torch.stack([common.load_image(os.path.join(out, f"{i:05d}_{j}.png"), c.image_size)
                              for i in range(len(rows)) for j in range(c.n)])
        grid_with_prompts(images, rows, c.n, os.path.join(out, "grid.png"))
        print(f"{len(texts)} prompts x {c.n} samples from {d or 'the base checkpoints'} in {out} (grid.png)")
    if world > 1:
        torch.distributed.destroy_process_group()
    return out


if __name__ == "__main__":
    common.plain_errors()
    main()
