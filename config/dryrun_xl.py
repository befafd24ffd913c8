# A dry run of the real LlamaGen-XL path (config/llamagen_xl_clip.py's values) at its real shapes, on a CPU: GPT-XL (36 layers), VQ-16, 256 px
# images (16 x 16 = 256 tokens), FLAN-T5-XL's 2048-wide features and a ViT-L/14 CLIP reward, all with
# random weights in the official file formats (data/xl_dryrun/prepare.py builds them into out/xl_dryrun,
# 4.8 GB, in about a minute), for one round with one prompt group of 2 rollouts. It checks the plumbing --
# loading, shapes, memory, time -- and says nothing about quality.
#   python ranke.py config/dryrun_xl.py
# fp32 on purpose: bf16 autocast on this CPU is emulated and slow, so a full-depth bf16 run is not
# practical on CPU (on a GPU: --device=cuda --dtype=bfloat16). Even in fp32 the full 36 layers hold the
# policy, pi_ref and AdamW's two moments (16 bytes a parameter, 12.4 GB) across the round, its gradients
# (3.1 GB) while Stage 1 runs, CLIP ViT-L/14 and the decoder stage: measured, the whole RankE round runs in
# 6 min on 2 cores at a peak of 23.0 GB, so run it with nothing else on a 24 GB machine.
import os
exec(open(os.path.join(os.path.dirname(__file__), "llamagen_xl_clip.py")).read())  # the preset's values ...
# ... but the models, data and sizes of the dry run
out_dir = "out/xl_dryrun_run"
prepare = "data/xl_dryrun/prepare.py --out=out/xl_dryrun"
gpt_ckpt = "out/xl_dryrun/gpt.pt"
vq_ckpt = "out/xl_dryrun/vq.pt"
t5_path = "out/xl_dryrun/t5"
train_prompts = "out/xl_dryrun/prompts.txt"
train_pairs = "out/xl_dryrun/pairs.jsonl"
clip_weights = "out/xl_dryrun/clip_vit_l_14.pt"
exec(open(os.path.join(os.path.dirname(__file__), "dryrun_sizes.py")).read())
