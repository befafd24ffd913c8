# RankE on LlamaGen-XL (t2i, 256 px) with the HPSv2 reward, 8 GPUs: config/llamagen_xl_clip.py but the
# reward. HPSv2 is scored as a black box, so L_BP is off and Rank-GAN alone carries it to the decoder.
#   torchrun --nproc_per_node=8 ranke.py config/llamagen_xl_hpsv2.py
import os
exec(open(os.path.join(os.path.dirname(__file__), "llamagen_xl_clip.py")).read())
out_dir = "out/llamagen_xl_hpsv2"
reward = "hpsv2"
hps_weights = "pretrained_models/HPS_v2.1_compressed.pt"  # or HPS_v2_compressed.pt
lambda_bp = 0.0
