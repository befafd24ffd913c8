# The authors' released recipe with the HPSv2 reward, trained on HPDv2's prompts and images:
# config/released_llamagen_xl_clip.py but the reward and the data. HPSv2 is scored without gradients, so L_BP is off (the release keeps a lambda_bp > 0
# on it, which does nothing).
#   torchrun --nproc_per_node=8 ranke.py config/released_llamagen_xl_hpsv2.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "released_llamagen_xl_clip.py")).read())
out_dir = "out/released_llamagen_xl_hpsv2"
reward = "hpsv2"
hps_weights = "pretrained_models/HPS_v2.1_compressed.pt"  # v2.1 if present, else HPS_v2_compressed.pt
hps_scale = 100.0  # 100 cos (vqrl_models: MultiRewardManager)
reward_resize = "crop"  # HPSv2's own preprocessing: bicubic resize and centre crop
lambda_bp = 0.0
train_prompts = "data/hpdv2/prompts.txt"  # HPDv2's training prompts and preferred images (train_hps_both.sh:
train_pairs = "data/hpdv2/pairs.jsonl"  # its 15k subset tar): python data/hpdv2/prepare.py --source=...
