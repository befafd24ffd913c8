# The authors' released recipe on LlamaGen-XL with the CLIP reward, 8 GPUs, value for value (the paper's
# method is config/llamagen_xl_clip.py; the release's switches are config/released.py).
#   torchrun --nproc_per_node=8 ranke.py config/released_llamagen_xl_clip.py
# "script" = scripts/training_llamagen/train_clip_both.sh; "trainer:N" = autoregressive/post_train/trainer.py.
import os
_here = os.path.dirname(__file__)
exec(open(os.path.join(_here, "llamagen_xl_clip.py")).read())  # the models and data ...
exec(open(os.path.join(_here, "released.py")).read())  # ... the release's switches ...
out_dir = "out/released_llamagen_xl_clip"  # ... and its sizes:
clip_model = "ViT-L-14"  # the reward CLIP (HF openai/clip-vit-large-patch14: OpenAI's weights)
clip_weights = "pretrained_models/open_clip_vit_l_14_openai.pt"
clip_quick_gelu = True
group_size = 8  # script
prompts_per_step = 32  # 4 prompts per GPU (script) x 8 GPUs
prompts_per_chunk = 2
policy_lr = 1e-6  # trainer:32 (the script's 1e-5 is dropped by post_train.py:274-278)
decoder_lr = 1e-5  # trainer:33 (the script's 5e-5 is dropped)
disc_lr = 2e-5  # trainer:34
decoder_batch = 4  # the 4 selected rollouts of a GPU's 4 prompts ...
real_batch = 4  # ... and its 4 ground-truth images
decoder_chunks = 8  # one per GPU
decoder_sync = "per_rank"  # its decoder's forward bypasses DDP and nothing all-reduces its gradients: 8 decoders, each
#                            on its GPU's 4 + 4 images, each scoring its GPU's rollouts; rank 0's is saved
rounds = 6000  # 6k steps (checkpoints evaluated at 500 ... 6000)
save_every = 500  # script SAVE_INTERVAL
sample_every = 500
