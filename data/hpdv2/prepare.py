"""HPDv2's training prompts and images as the HPSv2 runs read them: prompts.txt (Stage 1's prompts) and
pairs.jsonl (Stage 2's and SFT's real images with their captions), beside this file.

    python data/hpdv2/prepare.py --source=/data/HPD                             # HPDv2 itself (train.json, train/)
    python data/hpdv2/prepare.py --source=/data/train_subset_15k_hpdv2.tar      # the authors' release's subset

From HPDv2 (huggingface.co/datasets/ymhao/HPDv2, unzipped): every training prompt once, with the image
its annotators preferred (`human_preference` 1); the images stay where they are. From the release's
webdataset tar (`train_hps_both.sh` trains on `train_subset_15k_hpdv2.tar`: NAME.jpg + NAME.txt a
sample): every sample, its images unpacked into images/. The release does not say how its 15k were
drawn from HPDv2, so `--n` (a seeded draw) approximates its size, not its choice; its tar is exact.
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
out = here


def from_hpdv2(root):
    """(image path, prompt) for every training prompt: the image whose human_preference is 1."""
    with open(os.path.join(root, "train.json")) as f:
        rows = json.load(f)
    pairs = []
    for i, r in enumerate(rows):
        liked = [p for p, h in zip(r["file_path"], r["human_preference"]) if h == 1]
        if len(liked) != 1:
            raise ValueError(f"{root}/train.json, entry {i}: {len(liked)} preferred images, expected 1")
        pairs.append((os.path.join(root, liked[0]), r["prompt"]))
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
    cfg = {k: v for k, v in globals().items() if k in ("source", "n", "seed", "out")}
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
