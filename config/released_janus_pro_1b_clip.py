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
# Its gradient accumulation (2 micro-steps of 2 prompts a GPU, script GRAD_ACCUM) keeps only the last
# micro-step: accelerate skips zero_grad and step at the first, and the second's zero_grad wipes its
# gradients (policy, decoder and discriminator alike). So a step trains on 16 prompts and 16 + 16 images
# (the first micro-step's rollouts are drawn and scored, and change nothing), the decoder EMA moves at
# both micro-steps (ema_updates), and its step counter counts micro-steps: its step 6000 is 3000 here.
prompts_per_step = 16  # 2 prompts a GPU x 8 GPUs: the last micro-step's
prompts_per_chunk = 1
decoder_batch = 2  # the selected rollouts of a GPU's 2 prompts ...
real_batch = 2  # ... and its 2 ground-truth images
decoder_chunks = 8  # one per GPU
ema_updates = 2  # EMA_DECAY_VQ 0.99 at each micro-step
decoder_sync = "all_reduce"  # its Janus trainer all-reduces the decoder's gradients by hand
disc_start = 50  # 100 micro-steps
rounds = 3000  # its 6000 micro-steps
save_every = 250  # script SAVE_INTERVAL (500 micro-steps)
sample_every = 250
