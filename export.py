"""A round of a run back in its base model's own formats, for the official code:

    python export.py config/llamagen_xl_clip.py --run=out/llamagen_xl_clip --round=600 --out=export/xl_600
    python autoregressive/sample/sample_t2i.py --gpt-ckpt export/xl_600/gpt.pt --vq-ckpt export/xl_600/vq.pt \\
        --gpt-model GPT-XL --image-size 256          # LlamaGen's own script, in its repository

LlamaGen: OUT/gpt.pt holds {"model": the policy's state_dict}, as t2i_XL_stage1_256.pt does, and OUT/vq.pt
{"model": vq_ckpt's tensors with the round's post_quant_conv and decoder}: the encoder and the codebook
are the base tokenizer's, untouched, as RankE never trains them. Janus: a transformers folder OUT
(export_janus) for JanusForConditionalGeneration.from_pretrained. Give the run's config file as the
run was given it; the round's meta.json must agree on the models.
"""
import os
import sys

import torch

import common
import ranke
from checkpoint import read_state_dict
from configurator import defaults
from model_janus import export_janus
from model_vq import decoder_state_dict

# -- config --
run = "out/ranke"  # a run folder (round_NNNN inside)
round = -1  # the round to export; -1 = the last saved one
decoder = "decoder"  # the round's 'decoder' or its 'ema'
out = ""  # default: RUN/export_round_NNNN


def save_pt(tensors, path):
    """torch.save({"model": tensors}) via a temporary file and a rename, LlamaGen's checkpoint layout."""
    torch.save({"model": {k: v.contiguous() for k, v in tensors.items()}}, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    c = common.make_config({**ranke.settings(), **defaults(sys.modules[__name__])}, argv)
    if c.decoder not in ("decoder", "ema"):
        raise SystemExit(f"decoder must be 'decoder' or 'ema', not {c.decoder!r}")
    d = common.saved_round(c.run, c.round)
    common.check_round(c, d, "export.py")
    out = c.out or os.path.join(c.run, "export_" + os.path.basename(d))
    c.device = "cpu"
    policy, vq = common.load_round(c, d, c.decoder)
    if c.backbone == "janus":
        export_janus(policy, vq, c.gpt_ckpt, out)
    else:
        os.makedirs(out, exist_ok=True)
        save_pt(policy.state_dict(), os.path.join(out, "gpt.pt"))
        save_pt({**read_state_dict(c.vq_ckpt), **decoder_state_dict(vq)}, os.path.join(out, "vq.pt"))
    print(f"{d} exported to {out}")
    return out


if __name__ == "__main__":
    common.plain_errors()
    main()
