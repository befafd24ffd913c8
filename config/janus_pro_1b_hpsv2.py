# RankE on Janus-Pro-1B with the HPSv2 reward: config/janus_pro_1b_clip.py but the reward. HPSv2 is scored
# as a black box, so L_BP is off and Rank-GAN alone carries it to the decoder.
#   torchrun --nproc_per_node=8 ranke.py config/janus_pro_1b_hpsv2.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "janus_pro_1b_clip.py")).read())
out_dir = "out/janus_pro_1b_hpsv2"
reward = "hpsv2"
hps_weights = "pretrained_models/HPS_v2.1_compressed.pt"
lambda_bp = 0.0
