"""HPDv2's training prompts and images as the HPSv2 runs read them: prompts.txt (Stage 1's prompts) and
pairs.jsonl (Stage 2's and SFT's real images with their captions), beside this file.

    python data/hpdv2/prepare.py --source=/data/HPD                             # HPDv2 itself (train.json, train/)
    python data/hpdv2/prepare.py --source=/data/train_subset_15k_hpdv2.tar      # the authors' release's subset

From HPDv2 (huggingface.co/datasets/ymhao/HPDv2, unzipped): every training prompt once, with the image
its annotators preferred most often over its pairs (train.json holds one entry a compared pair,
`human_preference` 1 on the preferred one; `file_path` under train/); the images stay where they are. From the release's
webdataset tar (`train_hps_both.sh` trains on `train_subset_15k_hpdv2.tar`: NAME.jpg + NAME.txt a
sample): every sample, its images unpacked into images/. The release does not say how its 15k were
drawn from HPDv2, so `--n` (a seeded draw) approximates its size, not its choice; its tar is exact.
A run refuses a prompt longer than the policy's caption slots (120 T5 tokens at LlamaGen-XL), where the
release's T5 cuts it: `--t5_path=pretrained_models/t5-ckpt/flan-t5-xl` leaves such captions out here,
and says how many.
"""
import json
import os
import random
import sys
import tarfile

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(here)))
from configurator import configure  # noqa: E402

# -- config --
source = ""  # an unzipped HPDv2 folder (train.json) or a webdataset .tar of NAME.jpg / NAME.txt samples
n = 0  # HPDv2 only: this many prompts drawn with `seed` (0 = all)
seed = 0
t5_path = ""  # a local FLAN-T5 folder: captions over `slots` of its tokens (</s> included) are left out
slots = 120
out = here


def from_hpdv2(root):
    """(image path, prompt) for every training prompt, once: the image preferred in most of its pairs
    (the first such on a tie), its path under root/train/ (or root/)."""
    with open(os.path.join(root, "train.json")) as f:
        rows = json.load(f)
    wins = {}  # prompt -> {image: times preferred}, in first-seen order
    for i, r in enumerate(rows):
        liked = [p for p, h in zip(r["file_path"], r["human_preference"]) if h == 1]
        if len(liked) != 1:
            raise ValueError(f"{root}/train.json, entry {i}: {len(liked)} preferred images, expected 1")
        counts = wins.setdefault(r["prompt"], {})
        counts[liked[0]] = counts.get(liked[0], 0) + 1
    pairs = []
    for prompt, counts in wins.items():
        best = max(counts, key=counts.get)
        path = next((p for p in (os.path.join(root, "train", best), os.path.join(root, best)) if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"{root}/train.json: image {best!r} is neither in {root}/train nor in {root}")
        pairs.append((path, prompt))
    return pairs


def from_tar(path, images):
    """(image path, caption) for every NAME.jpg / NAME.png with its NAME.txt, the images unpacked."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            name, ext = os.path.splitext(m.name)
            if m.isfile() and ext.lower() in (".jpg", ".jpeg", ".png", ".webp", ".txt"):
                samples.setdefault(name, {})[ext.lower()] = tar.extractfile(m).read()
    os.makedirs(images, exist_ok=True)
    pairs = []
    for name, s in sorted(samples.items()):
        image = next((ext for ext in s if ext != ".txt"), None)
        if image is None or ".txt" not in s:
            raise ValueError(f"{path}: sample {name} lacks its {'image' if image is None else 'caption'}")
        file = os.path.join(images, name.replace("/", "_") + image)
        with open(file, "wb") as f:
            f.write(s[image])
        pairs.append((file, s[".txt"].decode("utf-8", errors="ignore")))
    return pairs


def main(argv=None):
    cfg = {k: v for k, v in globals().items() if k in ("source", "n", "seed", "t5_path", "slots", "out")}
    configure(cfg, sys.argv[1:] if argv is None else argv)
    src = cfg["source"]
    if os.path.isdir(src) and os.path.isfile(os.path.join(src, "train.json")):
        pairs = from_hpdv2(src)
        if cfg["n"]:
            pairs = random.Random(cfg["seed"]).sample(pairs, min(cfg["n"], len(pairs)))
    elif os.path.isfile(src) and src.endswith(".tar"):
        pairs = from_tar(src, os.path.join(cfg["out"], "images"))
    else:
        raise SystemExit(f"--source must be an unzipped HPDv2 folder holding train.json, or a webdataset .tar (got {src!r})")
    pairs = [(img, " ".join(caption.split())) for img, caption in pairs]  # one line a prompt
    pairs = [(img, caption) for img, caption in pairs if caption]
    if cfg["t5_path"]:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(cfg["t5_path"], local_files_only=True)
        fits = [len(ids) <= cfg["slots"] for ids in tokenizer([c.lower().strip() for _, c in pairs]).input_ids]
        print(f"{fits.count(False)} captions over {cfg['slots']} T5 tokens left out")
        pairs = [p for p, ok in zip(pairs, fits) if ok]
    if not pairs:
        raise SystemExit(f"{src}: no captioned images")
    for name, text in (("pairs.jsonl", "".join(json.dumps({"image": os.path.abspath(img), "caption": c}) + "\n"
                                               for img, c in pairs)),
                       ("prompts.txt", "".join(c + "\n" for _, c in pairs))):
        tmp = os.path.join(cfg["out"], name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(cfg["out"], name))
    print(f"{len(pairs)} prompts and images from {src} -> {cfg['out']}/pairs.jsonl, prompts.txt")


if __name__ == "__main__":
    main()
