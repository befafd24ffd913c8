# The XL dry run's bf16 path: config/dryrun_xl.py under bf16 autocast (fp32 master weights), as a GPU runs
# it, with GPT-XL at its full width but 2 of its 36 layers (CPU bf16 is emulated: a full-depth forward of
# one rollout takes about a minute). VQ-16, the ViT-L/14 reward and every shape but the depth are real.
#   python ranke.py config/dryrun_xl_bf16.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "dryrun_xl.py")).read())
out_dir = "out/xl_dryrun_bf16_run"
prepare = "data/xl_dryrun/prepare.py --out=out/xl_dryrun_2l --n_layer=2"
gpt_ckpt = "out/xl_dryrun_2l/gpt.pt"
gpt_layers = 2
vq_ckpt = "out/xl_dryrun_2l/vq.pt"
t5_path = "out/xl_dryrun_2l/t5"
train_prompts = "out/xl_dryrun_2l/prompts.txt"
train_pairs = "out/xl_dryrun_2l/pairs.jsonl"
clip_weights = "out/xl_dryrun_2l/clip_vit_l_14.pt"
dtype = "bfloat16"
