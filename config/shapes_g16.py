# The shapes world's setting where Std. RL's codes drift and its FD falls behind the base's as the reward
# rises (on the 3,000-step base: docs/history_shapes_base_3000.md): groups of 16 rollouts (twice the default's: better-ranked
# advantages), twice the former default's GRPO learning rate (5e-5), every evaluated round on 8 samples a prompt.
#   OMP_NUM_THREADS=1 python study.py config/shapes_g16.py --study_dir=out/study_g16 --arms=std_rl,ranke --seeds=1,2,3,4,5,6,7
#   (~20 min a run on one core; the docs' study ran each run on one thread)
train_prompts = "out/shapes/prompts_train.txt"  # all 732 of the world's training prompts
group_size = 16
policy_lr = 1e-4
eval_n_per_prompt = 8
out_dir = "out/shapes_g16"
