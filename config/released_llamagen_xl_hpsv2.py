# The authors' released recipe with the HPSv2 reward (HPDv2 prompts): config/released_llamagen_xl_clip.py
# but the reward. HPSv2 is scored without gradients, so L_BP is off (the release keeps a lambda_bp > 0
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
