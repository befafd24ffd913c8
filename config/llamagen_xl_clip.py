# RankE on LlamaGen-XL (t2i, 256 px) with the CLIP reward, 8 GPUs:
#   torchrun --nproc_per_node=8 ranke.py config/llamagen_xl_clip.py
# Std. RL baseline:  add --mode=policy_only --out_dir=out/llamagen_xl_clip_std_rl
# Values are Table F.1's; (r) marks a reconstruction (the paper's number was lost in conversion). Every switch
# not named here is the paper's method (the scripts' defaults). The authors' released recipe, which differs
# in most of these settings, is config/released_llamagen_xl_clip.py.
out_dir = "out/llamagen_xl_clip"
prepare = ""  # the official checkpoints are given, nothing to build
gpt_model = "GPT-XL"
gpt_ckpt = "pretrained_models/t2i_XL_stage1_256.pt"
vq_model = "VQ-16"
vq_ckpt = "pretrained_models/vq_ds16_t2i.pt"
image_size = 256
t5_path = "pretrained_models/t5-ckpt/flan-t5-xl"
train_prompts = "data/train/prompts.txt"  # the 15k curated prompts (Appendix H)
train_pairs = "data/train/pairs.jsonl"  # their images, for L_rec and the discriminator
reward = "clip"
clip_model = "ViT-L-14"  # (r) the paper does not name it; the release trains on ViT-L/14, never on the
clip_weights = "pretrained_models/open_clip_vit_l_14_openai.pt"  # ViT-B/32 that scores COCO's CLIP
clip_quick_gelu = True

# Stage 1 (GRPO)
group_size = 8
prompts_per_step = 32  # (r) 4 prompts x 8 rollouts per GPU per step
prompts_per_chunk = 2  # 2 prompts x 8 rollouts x 2 (CFG) = 32 rows per forward
ppo_epochs = 2  # (r)
policy_lr = 1e-6  # (r)
policy_weight_decay = 0.01
clip_eps = 0.2
beta = 0.05
ref_decay = 0.99  # (r)
cfg_scale = 7.5  # (r)
temperature = 1.0
top_k = 0
top_p = 0.9

# Stage 2 (decoder)
decoder_lr = 1e-5  # (r)
decoder_weight_decay = 0.05
decoder_betas = (0.5, 0.9)
disc_lr = 1e-5  # (r)
lambda_bp = 0.1  # (r)
lambda_gan = 0.5  # (r)
lambda_rec = 1.0  # (r)
lambda_cons = 1.0  # (r)
tau = 0.1
ema_decay = 0.999
decoder_batch = 16  # 2 prompt groups per forward
real_batch = 8
decoder_chunks = 16  # 2 per GPU per step  (r)
lpips_vgg = "pretrained_models/vgg16-397923af.pth"
lpips_lin = "pretrained_models/lpips_vgg.pth"

# the loop: 6k policy steps in all (Appendix F)
rounds = 600  # (r) how the 6k steps split into rounds
policy_steps = 10
decoder_steps = 10
save_every = 20  # the full state (~13 GB) every 200 policy steps; the hand-over files every round
sample_every = 20
eval_every = 0  # COCO-30K is its own job: eval.py config/eval_coco.py
