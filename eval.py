"""Evaluate the rounds of a RankE run: FID (or its stand-in), CLIP score, HPSv2 (and its benchmark's
styles), GenEval (the benchmark's scorer, ported; or the shapes world's micro version), and the
Latent-Covariate-Shift diagnostics (Appendix C), with per-round tables, curves and figures.

    python eval.py --run=out/ranke                                  # the micro world's held-out prompts
    python eval.py --run=out/ranke --compare=out/std_rl             # two runs side by side
    torchrun --nproc_per_node=8 eval.py config/eval_coco.py --run=out/llamagen_xl_clip
    torchrun --nproc_per_node=8 eval.py config/eval_geneval.py --run=out/llamagen_xl_clip

Generation (sharded over ranks, resumable: written images are skipped) follows the paper's protocol:
PNG via clamp(127.5 x + 128), a folder per sampling setting. FID follows clean-fid's "clean" protocol
with its TorchScript Inception (`inception-2015-12-05.pt`, the file clean-fid and StyleGAN use; loaded
with torch.jit.load, so no pickle is run): images in [0, 255], resized to 299 by clean-fid's own
resizer (PIL bicubic on float32 channels), optionally centre-cropped and LANCZOS-resized to 256 first
(fid_crop), 2048-d pool features, reference statistics cached, the Frechet distance in float64 torch.
Without that file, an FD in the evaluation CLIP's image-feature space is reported instead, named
FD_CLIP -- never called FID.
"""
import copy
import hashlib
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import common
from checkpoint import atomic_write
from common import init_dist, load_image, read_pairs, read_prompts, round_dir, save_grid
from configurator import configure, defaults
from figures import before_after, curves, table
from geneval import GenEval, geneval_folder, geneval_scores, read_geneval_specs

# -- config: what eval.py alone is pointed at (TARGET), then the evaluation's settings, which ranke.py's
#    in-loop evaluations take too. The data and models of a run come from its round's meta.json. --
run = "out/ranke"
compare = ""  # a second run, side by side in one table and plot
eval_rounds = ""  # "0,5,10"; "" = every round folder of the run
geneval_images = ""  # score a folder in GenEval's own layout (NNNNN/metadata.jsonl, NNNNN/samples/NNNN.png) and stop
TARGET = ("run", "compare", "eval_rounds", "geneval_images")
eval_prompts = "out/shapes/prompts_heldout.txt"  # COCO-30K: data/coco_captions_30k.csv
eval_pairs = "out/shapes/heldout_pairs.jsonl"  # real images for FID and the codes: {"image", "caption"} lines,
#                                             or a folder of images (COCO val2014); "" = none (GenEval alone)
eval_specs = "out/shapes/specs.json"  # prompt -> what a correct image holds: micro GenEval; GenEval's
#                                      evaluation_metadata.jsonl with geneval_detector: the real one; "" = none
geneval_detector = ""  # a local transformers Mask2Former folder (facebook/mask2former-swin-small-coco-instance)
geneval_clip_model = "ViT-L-14"  # GenEval's colour classifier: OpenAI CLIP ViT-L/14 (quick GELU) ...
geneval_clip_weights = ""  # ... its weights for open_clip
geneval_clip_quick_gelu = True
feature_net = "out/shapes/features.pt"  # TorchScript; COCO: clean-fid's inception-2015-12-05.pt
feature_size = 64  # 299 for Inception
fid_crop = 0  # > 0: both sets centre-cropped to the short side and resized to it with PIL's LANCZOS before
#               the FID network's own resize (LlamaGen's and the release's COCO evaluation: 256)
eval_clip_model = ""  # "" = the run's reward CLIP; COCO protocol: ViT-B-32 with OpenAI weights
eval_clip_weights = ""
eval_clip_quick_gelu = True
eval_clip_prefix = ""  # LlamaGen's COCO protocol: "A photo depicts "
eval_hps_weights = ""  # HPS_v2.1_compressed.pt: adds HPSv2 on the eval prompts
eval_hps_benchmark = ""  # a folder of the HPSv2 benchmark's style files (anime.json, concept-art.json, paintings.json,
#                          photo.json: lists of prompts): with eval_hps_weights, HPSv2 per style and averaged
eval_n_per_prompt = 4
eval_batch_size = 64
eval_cfg_scale = 1.5  # the shapes world (docs/shapes_world.md); LlamaGen's COCO protocol: 7.5, top-k 1000, top-p 1.0, temperature 1.0
eval_temperature = 1.0
eval_top_k = 0
eval_top_p = 1.0
eval_caption_padding = ""  # "" = the run's; 'left' (the release's GenEval sampler) | 'right' | 'right_zeroed' (its
#                            COCO and HPSv2 samplers: T5's output zeroed at every pad, the first image token's slot too)
eval_seed = 1234
kl_smoothing = 0.5  # add-alpha smoothing of the code histograms
eval_rec_images = 512  # the round's decoder on the ground-truth codes of the first N real images: rec_L1 and
#                        FD_rec (FID_rec), so a decoder that stops being a tokenizer decoder shows; 0 = off
grid_prompts = 16  # each evaluated round's eval_grid.png: the first image of the first N prompts
figure_prompts = 8  # the run's eval_before_after.png: the first N prompts, base and last round side by side
figure_train_n = 16  # a run on no more training prompts than figure_prompts (the default's 8): the figure shows those,
#                     each sampled N times at the first and last round, with their CLIP and GenEval; 0 = the eval prompts
SWITCHES = {"eval_caption_padding": ("", "left", "right", "right_zeroed")}


def check(c, world=1):
    """The evaluation's settings: the first that cannot run, as a message; '' if none."""
    return common.bad_switch(c, SWITCHES) or common.out_of_range(c, {"figure_train_n": common.NON_NEGATIVE})


# ---------------------------------------------------------------- metrics


def gaussian(feats):
    f = feats.double()
    return f.mean(0), torch.cov(f.t())


def frechet(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64; the trace of the matrix square root
    is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric PSD)."""
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp(min=0).sqrt()) @ v.t()
    tr_sqrt = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def code_histogram(codes, vocab):
    return torch.bincount(codes.flatten(), minlength=vocab).double()


def entropy_bits(hist):
    p = hist.double() / hist.sum()
    return -(p[p > 0] * p[p > 0].log2()).sum().item()


def code_kl(hist_p, hist_q, alpha=0.5):
    """KL(P || Q) in bits between unigram code frequencies, each smoothed by adding alpha to every
    count. P: the policy's codes, Q: the ground-truth codes of real images (Appendix C)."""
    p, q = (h.double() + alpha for h in (hist_p, hist_q))
    p, q = p / p.sum(), q / q.sum()
    return (p * (p / q).log2()).sum().item()


def clean_resize(image, size):
    """clean-fid's "clean" resize (its package, for exactness): from the uint8 image, PIL bicubic on each
    channel in float32, no quantisation after -> size x size x 3 float32 in [0, 255]."""
    from cleanfid.resize import make_resizer
    return make_resizer("PIL", False, "bicubic", (size, size))(np.asarray(image.convert("RGB")))


def fid_input(path, c):
    """An image file as the FID network sees it: (centre crop + LANCZOS to fid_crop,) then the clean resize
    to feature_size, 3 x size x size in [0, 255]."""
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot open image {path}: {e}") from None
    return fid_tensor(img, c)


def fid_tensor(img, c):
    """fid_input's transform of a PIL image (an image made in memory, as the world's redrawings)."""
    from PIL import Image
    if c.fid_crop:
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((c.fid_crop, c.fid_crop), Image.LANCZOS)
    return torch.from_numpy(clean_resize(img, c.feature_size)).permute(2, 0, 1)


def image_features(net, paths, c, batch=64):
    """Features of the FID network for image files, batch by batch."""
    return torch.cat([fid_features(net, torch.stack([fid_input(p, c) for p in paths[i:i + batch]]))
                      for i in range(0, len(paths), batch)])


def fid_features(net, x):
    """The FID network's features of a batch of fid_input tensors."""
    with torch.no_grad():
        return net(x.to(next(net.parameters()).device), return_features=True).float().cpu()


# ---------------------------------------------------------------- generation


def generate_images(c, rc, d, prompts, out, rank=0, world=1):
    """PNGs (and the codes) of every prompt x n_per_prompt with round folder d's policy and decoder,
    batch b on rank b % world, seeded by (seed, b); a batch already written is skipped."""
    from model_ar import generate
    os.makedirs(os.path.join(out, "codes"), exist_ok=True)
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(c.eval_n_per_prompt)]
    batches = [jobs[i:i + c.eval_batch_size] for i in range(0, len(jobs), c.eval_batch_size)]
    todo = [b for b in range(rank, len(batches), world)
            if not os.path.isfile(os.path.join(out, "codes", f"{b:06d}.safetensors"))]
    if not todo:
        return
    policy, vq = common.load_round(rc, d)
    bar = todo
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(todo, desc=f"generating {os.path.basename(d)}", leave=False)
    for b in bar:
        texts = [p for _, p in batches[b]]
        padded = SimpleNamespace(**{**vars(rc), "caption_padding": c.eval_caption_padding or rc.caption_padding})
        cond, mask = (t.to(rc.device) for t in common.caption_features(texts, padded, policy.config.cls_token_num))
        gen = torch.Generator(rc.device).manual_seed(common.rng(c.eval_seed, b).initial_seed())
        with torch.no_grad(), common.autocast(c):  # the evaluating process's dtype
            codes = generate(policy, cond, mask, c.eval_cfg_scale, c.eval_temperature, c.eval_top_k, c.eval_top_p, generator=gen)
            images = vq.decode(codes).float().clamp(-1, 1)
        for k, img in enumerate(images):
            save_grid(img[None], os.path.join(out, f"{b * c.eval_batch_size + k:06d}.png"), 1)
        common.atomic_save({"codes": codes.cpu(), "prompt_ids": torch.tensor([i for i, _ in batches[b]])},
                           os.path.join(out, "codes", f"{b:06d}.safetensors"))


def read_generated(out):
    """(codes, prompt ids, PNG paths) of a generation folder, in image order."""
    from safetensors.torch import load_file
    parts = [load_file(os.path.join(out, "codes", f)) for f in sorted(os.listdir(os.path.join(out, "codes")))]
    codes, ids = torch.cat([p["codes"] for p in parts]), torch.cat([p["prompt_ids"] for p in parts])
    return codes, ids, [os.path.join(out, f"{i:06d}.png") for i in range(len(codes))]


def image_batches(paths, size, n=64):
    for i in range(0, len(paths), n):
        yield torch.stack([load_image(p, size) for p in paths[i:i + n]])


# ---------------------------------------------------------------- one round


def to_u8(x):
    """Images in [-1, 1], B x 3 x H x W -> B x H x W x 3 uint8, as the evaluation reads them."""
    return ((x.cpu() + 1) * 127.5 + 0.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def redraw(u8, objects):
    """The shapes world's renderer's drawing of the objects read in each image, and each image's L1 to it
    (in [-1, 1] units): redraw_L1, how far an image is from a clean drawing of what it shows."""
    from data.shapes.world import draw
    redrawn = np.stack([draw(o) for o in objects])
    return redrawn, np.abs(redrawn.astype(np.float64) - u8).mean((1, 2, 3)) / 127.5


def image_stats(c, rc, paths, texts, net, clip, specs=None, vq=None, hps=None):
    """Read the images from disk once, in batches, for everything asked: the FID network's features,
    CLIP image features, and with texts the CLIP scores (and HPSv2's with hps); with vq the frozen
    tokenizer's codes; with specs the objects the shapes world's rule detector finds (micro GenEval), and
    each image redrawn from them by the world's renderer: its L1 to the image and the redrawings' features."""
    if specs is not None:
        from PIL import Image
        from data.shapes.world import count, read_objects  # the spec format of the shapes world
    out = {"feats": [], "clip_feats": [], "scores": [], "hps": [], "codes": [], "redraw_feats": [], "redraw_L1": []}
    counts, start = [], 0
    for x in image_batches(paths, rc.image_size):
        x, t = x.to(rc.device), texts[start:start + len(x)] if texts is not None else None
        if net is not None:  # from the files, as the FID protocol reads them
            out["feats"].append(image_features(net, paths[start:start + len(x)], c))
        start += len(x)
        with torch.no_grad():
            if vq is not None:
                out["codes"].append(vq.encode(x).cpu())
            f = clip.image_features(x)
            out["clip_feats"].append(f.cpu())
            if t is not None:
                out["scores"].append((f * clip.text_features(t)).sum(-1).cpu())
                if hps is not None:
                    out["hps"].append(hps(x, t).cpu())
        if specs is not None:
            u8 = to_u8(x)
            objects = [read_objects(im) for im in u8]
            counts += [count(o) for o in objects]
            redrawn, l1 = redraw(u8, objects)
            out["redraw_L1"].append(torch.from_numpy(l1))
            if net is not None:
                redrawn_x = torch.stack([fid_tensor(Image.fromarray(im), c) for im in redrawn])
                out["redraw_feats"].append(fid_features(net, redrawn_x))
    return {**{k: torch.cat(v) for k, v in out.items() if v}, "counts": counts}


def real_reference(c, rc, net, clip, vq):
    """Real images of the eval prompts, read once and cached next to the pairs file: FID
    statistics (and FD_CLIP's), and their ground-truth codes from the frozen tokenizer."""
    paths = reference_paths(c)
    where = os.path.abspath(c.eval_pairs) if os.path.isdir(c.eval_pairs) else os.path.dirname(os.path.abspath(c.eval_pairs))
    key = hashlib.sha1(json.dumps([paths, c.feature_net, c.feature_size, c.fid_crop, rc.vq_ckpt, rc.image_size,
                                 c.eval_clip_model or rc.clip_model, c.eval_clip_weights or rc.clip_weights]).encode()).hexdigest()[:12]
    cache = os.path.join(where, f"real_stats_{key}.safetensors")
    if os.path.isfile(cache):
        from safetensors.torch import load_file
        return load_file(cache)
    s = image_stats(c, rc, paths, None, net, clip, vq=vq)
    ref = {"codes": s["codes"]}
    ref["clip_mu"], ref["clip_sigma"] = gaussian(s["clip_feats"])
    if net is not None:
        ref["mu"], ref["sigma"] = gaussian(s["feats"])
    common.atomic_save(ref, cache)
    return ref


def reference_paths(c):
    """The real images of the evaluation: every image of a folder (COCO val2014), by name, or a pairs file's."""
    if not os.path.isdir(c.eval_pairs):
        return [p for p, _ in read_pairs(c.eval_pairs)]
    paths = sorted(os.path.join(c.eval_pairs, f) for f in os.listdir(c.eval_pairs)
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if not paths:
        raise ValueError(f"{c.eval_pairs} holds no .png / .jpg / .webp images")
    return paths


def decoder_fidelity(c, rc, d, ref, net, base_vq):
    """Round folder d's decoder on the ground-truth codes of the first eval_rec_images real images (from
    the frozen tokenizer): its mean L1 to the real images in [-1, 1] and the FD of its decodings against
    the real reference -- the decoder's own error, apart from anything the policy draws. Round 0 gives the
    base tokenizer's. The decodings are PNGs in d/rec_<reference>/, written once."""
    from model_vq import load_decoder
    paths = reference_paths(c)[:c.eval_rec_images]
    out = os.path.join(d, "rec_" + hashlib.sha1(repr([c.eval_pairs, len(paths)]).encode()).hexdigest()[:8])
    names = [os.path.join(out, f"{i:06d}.png") for i in range(len(paths))]
    if not all(os.path.isfile(p) for p in names):
        vq = load_decoder(copy.deepcopy(base_vq), os.path.join(d, "decoder.safetensors"))
        os.makedirs(out, exist_ok=True)
        for i in range(0, len(paths), 64):
            with torch.no_grad(), common.autocast(c):
                images = vq.decode(ref["codes"][i:min(i + 64, len(paths))].to(rc.device)).float().clamp(-1, 1)
            for k, img in enumerate(images):
                save_grid(img[None], names[i + k], 1)
    err = torch.cat([(x - y).abs().flatten(1).mean(1) for x, y in zip(image_batches(names, rc.image_size),
                                                                      image_batches(paths, rc.image_size))])
    m = {"rec_L1": err.mean().item()}
    if net is not None:
        key = ("FID" if "inception" in os.path.basename(c.feature_net) else "FD") + "_rec"
        m[key] = frechet(*gaussian(image_features(net, names, c)), ref["mu"], ref["sigma"])
    return m


def eval_folder(c, rc, d):
    """Where round folder d keeps the images of these sampling settings (a folder per protocol)."""
    sampling = [c.eval_prompts, c.eval_n_per_prompt, c.eval_batch_size, c.eval_cfg_scale, c.eval_temperature,
                c.eval_top_k, c.eval_top_p, c.eval_caption_padding or rc.caption_padding, c.eval_seed]
    return os.path.join(d, "eval_" + hashlib.sha1(repr(sampling).encode()).hexdigest()[:8])


HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def hps_styles(c):
    """The HPSv2 benchmark's styles whose prompt file is in eval_hps_benchmark, each with the eval config
    that samples it (its own image folder)."""
    files = {s: next((f for f in (os.path.join(c.eval_hps_benchmark, name + ".json") for name in ("benchmark_" + s, s))
                      if os.path.isfile(f)), None) for s in HPS_STYLES}  # as the release looks for them
    if not any(files.values()):
        raise FileNotFoundError(f"{c.eval_hps_benchmark} holds none of {', '.join(s + '.json' for s in HPS_STYLES)}"
                                " (nor benchmark_<style>.json)")
    return [(s, SimpleNamespace(**{**vars(c), "eval_prompts": f})) for s, f in files.items() if f]


def hps_benchmark(c, rc, d, hps):
    """The HPSv2 benchmark on round folder d, its images sampled as the eval prompts are: HPSv2_<style>,
    their mean over the styles, and the mean over every image pooled (the authors' release's "Avg.",
    which counts every style present)."""
    m, pooled = {}, []
    for style, cs in hps_styles(c):
        prompts = read_prompts(cs.eval_prompts)
        _, ids, paths = read_generated(eval_folder(cs, rc, d))
        texts, scores = [prompts[i] for i in ids], []
        for k, x in enumerate(image_batches(paths, rc.image_size)):
            with torch.no_grad():
                scores.append(hps(x.to(rc.device), texts[k * 64:k * 64 + len(x)]).cpu())
        scores = torch.cat(scores)
        m[f"HPSv2_{style}"], pooled = scores.mean().item(), pooled + [scores]
    m["HPSv2_styles_mean"] = sum(m.values()) / len(m)
    m["HPSv2_pooled"] = torch.cat(pooled).mean().item()
    return m


def evaluate_round(c, rc, d, rank=0, world=1, files=True):
    """Metrics of round folder d on the eval prompts; images land in d/eval_<settings>/ (and, with files,
    the round's eval.json and eval_grid.png in d)."""
    from losses import Reward
    from model_vq import load_vq
    prompts = read_prompts(c.eval_prompts)
    out = eval_folder(c, rc, d)
    generate_images(c, rc, d, prompts, out, rank, world)
    for _, cs in hps_styles(c) if c.eval_hps_benchmark and c.eval_hps_weights else []:
        generate_images(cs, rc, d, read_prompts(cs.eval_prompts), eval_folder(cs, rc, d), rank, world)
    if world > 1:
        torch.distributed.barrier()
    if rank:
        return None
    net = torch.jit.load(c.feature_net, map_location=rc.device).eval() if os.path.isfile(c.feature_net) else None
    base_vq = load_vq(rc.vq_ckpt, rc.vq_model).to(rc.device)  # the frozen tokenizer: ground-truth codes
    clip = Reward("clip", c.eval_clip_model or rc.clip_model, c.eval_clip_weights or rc.clip_weights, rc.device,
                  False, c.eval_clip_quick_gelu if c.eval_clip_model else rc.clip_quick_gelu, c.eval_clip_prefix)
    hps = Reward("hpsv2", "ViT-H-14", c.eval_hps_weights, rc.device, False) if c.eval_hps_weights else None
    specs = geneval = None
    if c.eval_specs and c.geneval_detector:
        specs = read_geneval_specs(c.eval_specs)
        geneval = GenEval(c.geneval_detector, c.geneval_clip_weights, rc.device, c.geneval_clip_model, c.geneval_clip_quick_gelu)
    elif c.eval_specs:
        specs = common.parse_json(c.eval_specs, common.read_text(c.eval_specs, "eval_specs"))
    codes, ids, paths = read_generated(out)
    texts = [prompts[i] for i in ids]
    ref = real_reference(c, rc, net, clip, base_vq) if c.eval_pairs else None  # GenEval alone needs no real images
    s = image_stats(c, rc, paths, texts, net, clip, None if geneval else specs, hps=hps)
    m = {"CLIP": 100 * s["scores"].mean().item()}
    if ref is None:
        pass
    elif net is not None:
        m["FID" if "inception" in os.path.basename(c.feature_net) else "FD"] = frechet(*gaussian(s["feats"]), ref["mu"], ref["sigma"])
    else:
        print(f"no FID network at {c.feature_net!r}: reporting FD_CLIP, the Frechet distance of CLIP image features")
        m["FD_CLIP"] = frechet(*gaussian(s["clip_feats"]), ref["clip_mu"], ref["clip_sigma"])
    if hps is not None:
        m["HPSv2"] = s["hps"].mean().item()
    if hps is not None and c.eval_hps_benchmark:
        m.update(hps_benchmark(c, rc, d, hps))
    if geneval is not None:
        m.update(geneval_scores([geneval(p, specs[i]) for p, i in zip(paths, ids.tolist())], [specs[i]["tag"] for i in ids.tolist()]))
    elif specs is not None:
        from data.shapes.world import correct
        ok = torch.tensor([correct(specs[t], n) for t, n in zip(texts, s["counts"])]).float()
        kinds = [specs[t]["kind"] for t in texts]
        m["GenEval"] = ok.mean().item()
        # what the images show apart from how they are drawn: each image redrawn by the world's renderer from
        # the objects read in it. FD_content: the redrawings' FD (content alone); redraw_L1: the rendering's error
        m["redraw_L1"] = s["redraw_L1"].mean().item()
        if ref is not None and net is not None:
            m["FD_content"] = frechet(*gaussian(s["redraw_feats"]), ref["mu"], ref["sigma"])
        for k, name in (("single", "GenEval_colour"), ("two", "GenEval_count"), ("pair", "GenEval_two_obj")):
            sel = [i for i, x in enumerate(kinds) if x == k]
            if sel:
                m[name] = ok[sel].mean().item()
    V = base_vq.config.codebook_size
    m["code_entropy"] = entropy_bits(code_histogram(codes, V))
    if ref is not None:
        gt, half = ref["codes"], len(ref["codes"]) // 2
        m["code_KL"] = code_kl(code_histogram(codes, V), code_histogram(gt, V), c.kl_smoothing)
        m["code_KL_real_floor"] = code_kl(code_histogram(gt[:half], V), code_histogram(gt[half:], V), c.kl_smoothing)
        m["code_entropy_real"] = entropy_bits(code_histogram(gt, V))
    if ref is not None and c.eval_rec_images:
        m.update(decoder_fidelity(c, rc, d, ref, net, base_vq))
    if files:
        grid = torch.stack([load_image(p, rc.image_size) for p in paths[:c.grid_prompts * c.eval_n_per_prompt:c.eval_n_per_prompt]])
        grid = F.interpolate(grid, scale_factor=max(1, 128 // rc.image_size), mode="nearest")  # tiles of >= 128 px
        save_grid(grid, os.path.join(d, "eval_grid.png"), nrow=8)
        atomic_write(os.path.join(d, "eval.json"), json.dumps(m, indent=1))
    return m


def trained_prompts(c, rc):
    """The evaluation of a run's own training prompts, when its before / after figure shows them (no more
    of them than figure_prompts, figure_train_n > 0, a run of rollouts: SFT trains on train_pairs): each
    sampled figure_train_n times, CLIP and micro GenEval (where eval_specs holds them), no real images;
    else None, also when the file is not here or is not the one the run trained on."""
    here = c.figure_train_n and getattr(rc, "mode", "") != "sft" and os.path.isfile(rc.train_prompts)
    if not here or common.file_digest(rc.train_prompts, "sha1") != getattr(rc, "prompts_sha1", None):
        return None
    prompts = read_prompts(rc.train_prompts)
    if len(prompts) > c.figure_prompts:
        return None
    specs = c.eval_specs if c.eval_specs and not c.geneval_detector else ""
    if specs and not set(prompts) <= set(common.parse_json(specs, common.read_text(specs, "eval_specs"))):
        specs = ""
    return SimpleNamespace(**{**vars(c), "eval_prompts": rc.train_prompts, "eval_n_per_prompt": c.figure_train_n,
                              "eval_pairs": "", "eval_specs": specs, "eval_hps_weights": "", "eval_hps_benchmark": "",
                              "feature_net": ""})


# ---------------------------------------------------------------- the runs' report


TRAINED = "The prompts it trained on"


def heading(trained):
    if trained is None:
        return ""
    n = trained.eval_n_per_prompt
    return f"the training prompts: fresh samples (seed {trained.eval_seed}), {min(2, n)} of {n} each"


def report(c, configs, results, rewards, where):
    """The runs' table and curves in `where`, and each run's before / after figure in its own folder
    (when its first and last evaluated rounds still hold their images); with two runs, one more figure in
    `where`: the first run's base beside each run's last round. configs, results, rewards: by run."""
    text = table(results)
    atomic_write(os.path.join(where, "eval_table.md"), text + "\n")  # written again below with the training prompts
    curves(results, os.path.join(where, "eval_curves.png"),
           {k: {r: v for r, v in d.items() if v is not None} for k, d in rewards.items()})
    ends = {name: (min(r), max(r)) for name, r in results.items()}
    shown = {name: trained_prompts(c, configs[name]) for name in results}  # each run's figure: its training prompts ...
    if len({configs[name].train_prompts for name in results}) > 1 or None in shown.values():
        shown = dict.fromkeys(results)  # ... unless the runs trained on different ones, or a run on too many
    have = lambda name, r: os.path.isdir(eval_folder(shown[name] or c, configs[name], round_dir(name, r))) or (
        shown[name] is not None and os.path.isfile(os.path.join(round_dir(name, r), "policy.safetensors")))
    trained = {}  # (run, round): the training prompts' metrics

    def column(name, r, title):
        fc = shown[name] or c
        if fc is not c and (name, r) not in trained:
            trained[name, r] = evaluate_round(fc, configs[name], round_dir(name, r), files=False)
        return title, eval_folder(fc, configs[name], round_dir(name, r)), trained.get((name, r), results[name][r])
    for name, (first, last) in ends.items():
        if last > first and have(name, first) and have(name, last):
            before_after(shown[name] or c, [column(name, first, f"round {first}{' (base)' if first == 0 else ''}"),
                                            column(name, last, f"round {last}")], os.path.join(name, "eval_before_after.png"),
                         heading(shown[name]))
    if len(results) > 1 and all(have(name, r) for name, ends_ in ends.items() for r in ends_):
        first_run = next(iter(results))
        before_after(shown[first_run] or c, [column(first_run, ends[first_run][0], f"round {ends[first_run][0]}")] +
                     [column(name, last, f"{os.path.basename(name.rstrip('/'))}, round {last}") for name, (_, last) in ends.items()],
                     os.path.join(where, "eval_before_after.png"), heading(shown[first_run]))
    by_run = {}
    for (name, r), m in trained.items():
        by_run.setdefault(name, {})[r] = m
    if by_run:
        text += f"\n\n{TRAINED}, {c.figure_train_n} samples each (the figure's):\n\n" + table(by_run)
        atomic_write(os.path.join(where, "eval_table.md"), text + "\n")
    return text


def run_config(run_dir, c):
    meta = common.read_meta(round_dir(run_dir, 0))["config"]
    rc = SimpleNamespace(**{**defaults(common), **meta})  # a run from before a key existed has its default
    rc.device = c.device
    rc.out_dir, rc.t5_cache = run_dir, common.t5_cache(rc, run_dir)
    return rc


def main(argv=None):
    cfg = {**defaults(common), **defaults(sys.modules[__name__])}
    configure(cfg, argv)
    c = SimpleNamespace(**cfg)
    msg = check(c)
    if msg:
        raise SystemExit(msg)
    rank, world, c.device = init_dist(c.device)
    common.check_dtype(c.device, c.dtype)
    if c.geneval_images:  # images made elsewhere, in GenEval's layout
        m = geneval_folder(c)
        print(" | ".join(f"{k} {v:.4f}" for k, v in m.items()))
        return m
    results, rewards, configs = {}, {}, {}
    for run_dir in [c.run] + ([c.compare] if c.compare else []):
        if not os.path.isdir(round_dir(run_dir, 0)):
            raise SystemExit(f"{run_dir} holds no round_0000: not a RankE run folder")
        rc = configs[run_dir] = run_config(run_dir, c)
        avail = sorted(int(x[6:]) for x in os.listdir(run_dir) if x.startswith("round_") and x[6:].isdigit())
        logged, rewards[run_dir] = {}, {}  # ranke.py's log: each round's reward, and its in-loop evaluations
        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            for line in open(os.path.join(run_dir, "metrics.jsonl")):
                x = json.loads(line)
                if "reward" in x:
                    rewards[run_dir][x["round"]] = x["reward"]
                if "eval" in x:
                    logged[x["round"]] = x["eval"]
        wanted = [int(x) for x in c.eval_rounds.split(",")] if c.eval_rounds else sorted(set(avail) | set(logged))
        missing = sorted(set(wanted) - set(avail) - set(logged))
        if missing:
            raise SystemExit(f"{run_dir} has no round folder for rounds {missing} (it has {avail})")
        gone = sorted(set(wanted) - set(avail))
        if gone and rank == 0:  # retention (keep_last, keep_every) removed them; the training log kept their metrics
            print(f"{run_dir}: rounds {gone} are read from metrics.jsonl (evaluated during training, with the run's settings)")
        results[run_dir] = {r: (evaluate_round(c, rc, round_dir(run_dir, r), rank, world) if r in avail
                                else (dict(logged[r]) if rank == 0 else None)) for r in wanted}
        for r in wanted:
            if r in rewards[run_dir] and results[run_dir][r] is not None:
                results[run_dir][r]["reward"] = rewards[run_dir][r]
    if rank == 0:
        where = c.run if not c.compare else os.path.dirname(os.path.abspath(c.run))
        print(report(c, configs, results, rewards, where))
    return results


if __name__ == "__main__":
    common.plain_errors()
    main()
