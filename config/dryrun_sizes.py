# The dry runs' sizes (config/dryrun_xl.py, config/dryrun_janus.py run it after their preset): one round,
# one step of each stage, one prompt group, no sample grids or evaluation, fp32 on the CPU.
clip_model = "ViT-L-14"  # the reward's real architecture, random weights
lpips_vgg = ""  # no LPIPS files here: L_rec is L1
lpips_lin = ""

# Stage 1 (GRPO): one prompt, 2 rollouts (x 2 rows for CFG); Stage 2: that group and one real image
group_size = 2
prompts_per_step = 1
prompts_per_chunk = 1
decoder_batch = 2
real_batch = 1
decoder_chunks = 1

# the loop: one round, one step of each stage, no sample grids, no evaluation
rounds = 1
policy_steps = 1
decoder_steps = 1
save_every = 1
sample_every = 0
eval_every = 0
dtype = "float32"
device = "cpu"
