# The authors' released recipe (config/released.py) on the embedded shapes world, beside the paper's recipe
# (`python ranke.py`): every switch of the release, one step of each stage a round, with the shapes
# world's models and learning rates and the default run's step counts (30 GRPO and 30 decoder steps).
#   python ranke.py config/released_shapes.py
# Two release values cannot carry over: LPIPS needs VGG weights the shapes world lacks, so L_cons is the
# MSE at the release's weight; disc_start 100 of 6000 steps becomes 1 of 30.
import os
exec(open(os.path.join(os.path.dirname(__file__), "released.py")).read())
out_dir = "out/released_shapes"
train_prompts = "out/shapes/prompts_train.txt"  # the world's whole training set at the former default's lr, as
policy_lr = 5e-5  #                                config/shapes_all.py (each step's real images are its prompts')
decoder_sync = "per_rank"  # as its LlamaGen trainer (the same as all_reduce on one process)
cons_kind = "mse"
disc_start = 1
decoder_batch = 1  # the best rollout of each of a step's 8 prompts, one per chunk, with a real image
decoder_chunks = 8
rounds = 30
save_every = 15
sample_every = 15
eval_every = 15  # rounds 0, 15, 30: the default run's 0, 5, 10 in steps
