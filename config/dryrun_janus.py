# A dry run of the real Janus-Pro-1B path (config/janus_pro_1b_clip.py's values) at its real shapes, on a
# CPU: a transformers Janus folder with Janus-Pro-1B's widths (language model 2048 wide over 102,400 text
# tokens, VQ-16 at 384 px: 24 x 24 = 576 tokens, the generation head over 16,384 codes) but 6 of its 24
# layers, and a ViT-L/14 CLIP reward, all random (data/xl_dryrun/prepare.py --backbone=janus), for one
# round with one prompt group of 2 rollouts. It checks the plumbing -- loading, shapes, memory, time.
#   python ranke.py config/dryrun_janus.py
# fp32 and 6 layers: the full 24 in fp32 hold ~1.5B policy numbers x 20 bytes (policy, pi_ref, AdamW,
# gradients) = 29 GB, over this machine's 24; and CPU bf16 is emulated (2-8x slower than fp32).
import os
exec(open(os.path.join(os.path.dirname(__file__), "janus_pro_1b_clip.py")).read())
out_dir = "out/janus_dryrun_run"
prepare = "data/xl_dryrun/prepare.py --out=out/janus_dryrun --backbone=janus --n_layer=6"
gpt_ckpt = "out/janus_dryrun/janus"
vq_ckpt = "out/janus_dryrun/janus"
train_prompts = "out/janus_dryrun/prompts.txt"
train_pairs = "out/janus_dryrun/pairs.jsonl"
clip_weights = "out/janus_dryrun/clip_vit_l_14.pt"
janus_prompt_len = 32
exec(open(os.path.join(os.path.dirname(__file__), "dryrun_sizes.py")).read())
