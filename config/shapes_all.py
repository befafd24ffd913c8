# The shapes world's whole training set (732 prompts) at the former default's GRPO learning rate: the default run
# and study before 2026-12-06, when the default moved to the 8 prompts the base draws worst (docs/shapes_world.md).
#   python ranke.py config/shapes_all.py
#   python study.py config/shapes_all.py --arms=ranke,std_rl,released --seeds=1,2,3   # docs/recipes.md's table
train_prompts = "out/shapes/prompts_train.txt"
policy_lr = 5e-5
out_dir = "out/shapes_all"
