# The paper's setting (config/llamagen_xl_clip.py) on 24 GB cards: the same step, in less memory at once.
# bench.py --mode=memory counts 23.3 GiB a GPU for RankE here against 50.4 GiB with the paper preset as it is
# (docs/performance.md); the price is one more policy forward a PPO epoch (bench.py --mode=flops).
import os
exec(open(os.path.join(os.path.dirname(__file__), "llamagen_xl_clip.py")).read())
out_dir = "out/llamagen_xl_clip_24gb"
grad_checkpoint = True  # the policy's blocks keep only their inputs, and run again in the backward
decoder_batch = 4  # a decoder step in 64 chunks of 4 rollouts + 2 real images instead of 16 of 16 + 8: the same
real_batch = 2  # images a step (only the PatchGAN's BatchNorm, over a chunk's images, sees fewer at a time)
decoder_chunks = 64
