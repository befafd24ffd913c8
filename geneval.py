"""GenEval's scorer, ported: djghosh13/geneval's evaluation/evaluate_images.py with transformers' Mask2Former
in place of mmdet's (the same architecture, Swin-S, COCO instances; other weights, so numbers come close
to the official ones without being them) and open_clip's ViT-L/14 for the colours, as there. eval.py
scores a run's images with it; `--geneval_images` scores a folder in GenEval's own layout.
"""
import json
import os

import torch
import torch.nn.functional as F

from checkpoint import BadInput, atomic_write
from common import read_text

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_RELATIONS = ("left of", "right of", "above", "below")
GENEVAL_NAMES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "geneval", "object_names.txt")


def read_geneval_specs(path):
    """GenEval's metadata, a spec a line (tag, prompt, `include` and `exclude` clauses), each checked:
    a line that does not parse is one error naming it."""
    names = set(open(GENEVAL_NAMES).read().split("\n"))
    specs = []
    for i, line in enumerate(read_text(path, "GenEval metadata").split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            bad = r.get("tag") not in GENEVAL_TAGS or not isinstance(r.get("prompt"), str) or not r.get("include")
            for k, req in enumerate(r.get("include", [])):
                rel, j = req.get("position", ("above", -1))
                bad |= (req.get("class") not in names or int(req.get("count", 0)) < 1
                        or req.get("color", "red") not in GENEVAL_COLORS
                        or ("position" in req and (rel not in GENEVAL_RELATIONS or not 0 <= j < k)))
            for req in r.get("exclude", []):
                bad |= req.get("class") not in names or int(req.get("count", 0)) < 1
        except (ValueError, TypeError, AttributeError):
            bad = True
        if bad:
            raise BadInput(f"{path}:{i}: not a GenEval spec (a tag of {GENEVAL_TAGS}, a prompt, 'include' "
                             f"clauses of a COCO class, a count, an optional colour or position): {line.strip()[:100]}")
        specs.append(r)
    return specs


def relative_position(box_a, box_b, margin=0.1):
    """GenEval's relations of box A to box B (x1, y1, x2, y2): the centres' offset, shrunk on each axis by
    `margin` x the sum of the two boxes' sizes; a relation holds when its axis carries over half of it."""
    boxes = torch.tensor([box_a[:4], box_b[:4]], dtype=torch.float64).view(2, 2, 2)
    (ca, cb), (da, db) = boxes.mean(1), (boxes[:, 1] - boxes[:, 0]).abs()
    offset = ca - cb
    revised = (offset.abs() - margin * (da + db)).clamp(min=0) * offset.sign()
    if (revised.abs() < 1e-3).all():
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    return {rel for rel, on in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                ("below", dy > 0.5)) if on}


def geneval_correct(objects, spec, colours):
    """GenEval's verdict on one image: `objects` maps a class name to its detections (box, mask), most
    confident first; every `include` clause must hold (count, then the colour of that many, then the
    position of each against every object of the clause it names), and no `exclude` clause. colours(
    classname, detections) -> their colour names."""
    matched = []
    for req in spec["include"]:
        found = objects.get(req["class"], [])[:req["count"]]
        ok = len(found) >= req["count"]
        if ok and "color" in req:
            ok = colours(req["class"], found).count(req["color"]) >= req["count"]
        if ok and "position" in req:
            rel, target = req["position"]
            ok = matched[target] is not None and all(rel in relative_position(a[0], b[0])
                                                     for a in found for b in matched[target])
        matched.append(found if ok else None)
    return all(m is not None for m in matched) and not any(
        len(objects.get(req["class"], [])) >= req["count"] for req in spec.get("exclude", []))


def mask_box(mask):
    """The box (x1, y1, x2 + 1, y2 + 1) of a binary mask, as mmdet's mask2bbox; zeros when it is empty."""
    ys, xs = mask.nonzero(as_tuple=True)
    return [0.0] * 4 if len(xs) == 0 else [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


class GenEval:
    """The scorer's models: Mask2Former (instances: a query's score is its class probability x the mean
    mask probability inside its binary mask; per class at most 16 above 0.3, or 0.9 for counting) and
    CLIP ViT-L/14 (colour of each masked crop on GenEval's grey, zero-shot over 10 colours x 3 templates)."""

    def __init__(self, detector, clip_weights, device="cpu", clip_model="ViT-L-14", quick_gelu=True):
        import open_clip
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
        if not os.path.isdir(detector):
            raise FileNotFoundError(f"GenEval detector folder not found: {detector} (a local copy of "
                                    f"facebook/mask2former-swin-small-coco-instance)")
        self.processor = AutoImageProcessor.from_pretrained(detector, local_files_only=True)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(detector, local_files_only=True).to(device).eval()
        self.names = [line.strip() for line in open(GENEVAL_NAMES)]
        if self.model.config.num_labels != len(self.names):
            raise ValueError(f"{detector} detects {self.model.config.num_labels} classes, not GenEval's 80 COCO classes")
        if clip_model.endswith(".json"):
            open_clip.add_model_config(clip_model)
            clip_model = os.path.basename(clip_model)[:-len(".json")]
        self.clip, _, self.transform = open_clip.create_model_and_transforms(
            clip_model, pretrained=clip_weights, force_quick_gelu=quick_gelu, device=device)
        self.clip.eval()
        self.tokenizer, self.device, self.classifiers = open_clip.get_tokenizer(clip_model), device, {}

    @torch.no_grad()
    def objects(self, image, threshold, max_objects=16):
        x = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        out = self.model(pixel_values=x)
        probs = out.class_queries_logits[0].softmax(-1)[:, :-1]  # the last class is "no object"
        Q, C = probs.shape
        scores, flat = probs.flatten().topk(Q)  # mmdet keeps as many (query, class) pairs as there are queries
        logits = F.interpolate(out.masks_queries_logits[0, flat // C][None], size=x.shape[-2:], mode="bilinear")
        logits = F.interpolate(logits, size=(image.height, image.width), mode="bilinear")[0]
        masks = logits > 0
        scores = scores * (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
        found = {}
        for i in scores.argsort(descending=True).tolist():
            name = self.names[flat[i] % C]
            if scores[i] > threshold and len(found.setdefault(name, [])) < max_objects:
                found[name].append((mask_box(masks[i]) + [scores[i].item()], masks[i].cpu()))
        return {k: v for k, v in found.items() if v}

    @torch.no_grad()
    def colours(self, image, found, classname):
        from PIL import Image
        if classname not in self.classifiers:  # clip_benchmark's zero-shot classifier
            templates = (f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", "a photo of a {c} object")
            w = [F.normalize(F.normalize(self.clip.encode_text(self.tokenizer([t.format(c=col) for t in templates]).to(
                self.device)).float(), dim=-1).mean(0), dim=0) for col in GENEVAL_COLORS]
            self.classifiers[classname] = torch.stack(w)
        grey = Image.new("RGB", image.size, "#999")
        crops = [Image.composite(image, grey, Image.fromarray(mask.numpy())).crop(box[:4]) for box, mask in found]
        f = F.normalize(self.clip.encode_image(torch.stack([self.transform(x) for x in crops]).to(self.device)).float(), dim=-1)
        return [GENEVAL_COLORS[i] for i in (f @ self.classifiers[classname].t()).argmax(1).tolist()]

    def __call__(self, path, spec):
        from PIL import Image
        image = Image.open(path).convert("RGB")
        objects = self.objects(image, 0.9 if spec["tag"] == "counting" else 0.3)
        return geneval_correct(objects, spec, lambda name, found: self.colours(image, found, name))


def geneval_scores(correct, tags):
    """Per-tag fractions of correct images, and GenEval = their mean over the tags present."""
    m = {f"GenEval_{t}": sum(ok for ok, x in zip(correct, tags) if x == t) / tags.count(t) for t in GENEVAL_TAGS if t in tags}
    return {"GenEval": sum(m.values()) / len(m), **m}


def geneval_folder(c):
    """Score a folder in GenEval's own layout: one NNNNN/ per prompt of eval_specs with its metadata.jsonl
    and samples/NNNN.png (or NNNNN.png, as the authors' release writes them), eval_n_per_prompt of them;
    anything missing or extra is one error, before any scoring. Writes geneval.json into the folder."""
    specs, root, n = read_geneval_specs(c.eval_specs), c.geneval_images, c.eval_n_per_prompt
    have = {d: sorted(f for f in os.listdir(os.path.join(root, d, "samples")) if f.endswith(".png"))
            for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "samples"))}
    digits = {d: 5 if any(len(f) == len("00000.png") for f in files) else 4 for d, files in have.items()}
    want = {f"{i:05d}": [f"{k:0{digits.get(f'{i:05d}', 4)}d}.png" for k in range(n)] for i in range(len(specs))}
    wrong = [f"{d}: {have.get(d, [])} for {files}" for d, files in want.items() if have.get(d) != files]
    wrong += [f"{d}: not a prompt of {c.eval_specs}" for d in have if d not in want]
    if wrong:
        raise SystemExit(f"{root} is not a GenEval folder of {len(specs)} prompts x {n} images: "
                         + "; ".join(wrong[:5]) + (f" ... ({len(wrong)} in all)" if len(wrong) > 5 else ""))
    scorer = GenEval(c.geneval_detector, c.geneval_clip_weights, c.device, c.geneval_clip_model, c.geneval_clip_quick_gelu)
    jobs = [(os.path.join(root, d, "samples", f), specs[int(d)]) for d in sorted(want) for f in want[d]]
    m = geneval_scores([scorer(path, spec) for path, spec in jobs], [spec["tag"] for _, spec in jobs])
    atomic_write(os.path.join(root, "geneval.json"), json.dumps(m, indent=1))
    return m
