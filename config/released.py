# The switches of the authors' released recipe (github syjmelody/RankE), on any world: every setting in
# which the release departs from the paper, value for value. The released presets build on it
# (config/released_llamagen_xl_clip.py, _hpsv2.py, released_shapes.py) and add their models and sizes.
# "script" = scripts/training_llamagen/train_clip_both.sh; "trainer:N" = autoregressive/post_train/trainer.py.
caption_padding = "right"  # the T5 wrapper's tokenizer layout, unchanged (trainer:393-398)
clip_scale = 100.0  # 100 cos (trainer:308)
reward_resize = "squash"  # bilinear to the CLIP's square, no crop (vqrl_models.py: _preprocess_clip_differentiable)
t5_dtype = "bfloat16"  # its T5Embedder in the run's mixed precision, bf16 (post_train.py:61-63)
hps_input = "pil"  # HPSv2 scores uint8 PIL images through open_clip's transform (vqrl_models.py:302-304) ...
hps_fp16 = True  # ... under fp16 autocast (vqrl_models.py:307)
score_fp32 = True  # rewards, L_BP's reward and L_cons's LPIPS outside autocast, on decodings cast to fp32 (trainer:660-698)

# Stage 1 (GRPO)
cfg_scale = 6.0  # script GEN_CFG
temperature = 1.0
top_k = 1000  # trainer default gen_top_k
top_p = 1.0  # no top-p filter
logprob = "cond_only"  # teacher-forced conditional logits, full softmax (trainer:331-381)
old_logprobs = "recompute"  # pi_old from that forward right after sampling (trainer:415)
ppo_epochs = 1
clip_eps = 0.2
kl_estimator = "k2"  # 0.5 (log p - log p_ref)^2 (trainer:501)
beta = 0.05  # script KL_COEF
ref_decay = 1.0  # a fixed copy of the base policy (--use-fixed-ref-model)
policy_betas = (0.9, 0.999)
policy_weight_decay = 0.01
reward_decoder = "ema"  # rewards of images from the EMA decoder

# Stage 2 (decoder)
selection = "top_k"  # the best rollout of each group only (script REJECTION_K = 1), weight 1
select_k = 1
select_temp_start, select_temp_end, select_anneal = 4.0, 1.0, 0.2  # script (inert with one per group)
decoder_betas = disc_betas = (0.9, 0.999)  # AdamW's defaults
decoder_weight_decay = disc_weight_decay = 0.01
disc_fakes = "reconstructions"  # the discriminator never sees policy decodings
disc_first = True  # its step comes before the decoder's (trainer:543-766)
disc_start = 100
disc_weight = 0.5  # scales its loss and every GAN term
rec_gan = True  # the ground-truth stream's adaptive-weight GAN term
lambda_rec = 1.0  # L1 + LPIPS (+ that GAN term)
lambda_gan = 1.0  # script LAMBDA_DEC_GAN; x disc_weight 0.5 on the top-1 decodings
lambda_cons = 10.0  # script LAMBDA_DEC_CONSISTENCY
cons_kind = "lpips"  # LPIPS(clamped decoding, clamped EMA decoding)
cons_schedule = "none"
clamp_policy_images = True
lambda_bp = 0.01  # script LAMBDA_DEC_REWARD, on 100 cos
ema_decay = 0.99  # script EMA_DECAY_VQ, every step
real_images = "prompts"  # a step's real images are its prompts' own: its batches are image-caption pairs

# the loop: no rounds -- one step of each stage, alternating
policy_steps = 1
decoder_steps = 1
