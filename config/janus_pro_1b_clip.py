# RankE on Janus-Pro-1B (384 px, 24 x 24 = 576 tokens) with the CLIP reward, 8 GPUs:
#   torchrun --nproc_per_node=8 ranke.py config/janus_pro_1b_clip.py
# Std. RL baseline:  add --mode=policy_only --out_dir=out/janus_pro_1b_clip_std_rl
# The method's values are config/llamagen_xl_clip.py's (Table F.1; (r) marks a reconstruction); what
# follows is the backbone and the sizes it needs. The authors' released recipe: config/released_janus_pro_1b_clip.py.
import os
exec(open(os.path.join(os.path.dirname(__file__), "llamagen_xl_clip.py")).read())
out_dir = "out/janus_pro_1b_clip"
backbone = "janus"
gpt_ckpt = "pretrained_models/Janus-Pro-1B"  # transformers' folder (deepseek-community/Janus-Pro-1B layout)
vq_model = "VQ-16"  # Janus-Pro's image tokenizer is LlamaGen's VQ-16 ...
vq_ckpt = "pretrained_models/Janus-Pro-1B"  # ... read from the same folder
image_size = 384
janus_prompt_len = 128  # template + prompt + image-start token; a longer prompt is refused at the start
cfg_scale = 5.0  # (r) Janus-Pro's own sampling default (DeepSeek's generation_inference.py, and the release)
prompts_per_chunk = 1  # 8 rollouts x 2 (CFG) = 16 rows of 704 positions per forward
decoder_batch = 8  # one prompt group per forward at 384 px
real_batch = 4
decoder_chunks = 32  # 256 rollouts a step, as on LlamaGen-XL
