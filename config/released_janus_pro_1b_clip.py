# The authors' released recipe on Janus-Pro-1B with the CLIP reward, 8 GPUs, value for value (the paper's
# method is config/janus_pro_1b_clip.py; the release's switches are config/released.py).
#   torchrun --nproc_per_node=8 ranke.py config/released_janus_pro_1b_clip.py
# "script" = scripts/training_janus/train_clip_both.sh; "trainer:N" = janus/post_train/trainer.py.
import os
_here = os.path.dirname(__file__)
exec(open(os.path.join(_here, "janus_pro_1b_clip.py")).read())  # the models and data ...
exec(open(os.path.join(_here, "released.py")).read())  # ... the release's switches ...
out_dir = "out/released_janus_pro_1b_clip"  # ... and its Janus values:
caption_padding = "left"  # Janus prompts are left-padded, positions counted from the mask (trainer:397-408)
cfg_scale = 5.0  # script GEN_CFG
top_k = 1000  # trainer gen_top_k
beta = 0.05  # script KL_COEF
lambda_cons = 5.0  # script LAMBDA_DEC_CONSISTENCY (LPIPS)
lambda_bp = 0.05  # script LAMBDA_DEC_REWARD, on 100 cos
policy_lr = 1e-6  # trainer:32 (the script's 1e-4 is dropped by post_train.py:297-301, as on LlamaGen)
decoder_lr = 1e-5  # trainer:33 (the script's 5e-5 is dropped)
disc_lr = 2e-5  # trainer:34
prompts_per_step = 32  # 2 prompts per GPU x 2 accumulation steps (script) x 8 GPUs
prompts_per_chunk = 1
decoder_batch = 4  # the selected rollouts of a GPU's 4 prompts ...
real_batch = 4  # ... and its 4 ground-truth images
decoder_chunks = 8  # one per GPU
rounds = 6000
save_every = 500  # script SAVE_INTERVAL
sample_every = 500
