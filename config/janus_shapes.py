# RankE with the Janus-Pro backbone on the embedded shapes world: a tiny Janus (a transformers folder that
# data/shapes/prepare.py --backbone=janus trains on the world's codes, beside gpt.pt), the world's VQ as
# its image tokenizer, and every other setting of the default run (its 8 prompts were picked for GPT-micro;
# config/shapes_all.py before this file: the whole world).
#   python ranke.py config/janus_shapes.py
#   python ranke.py config/janus_shapes.py --mode=policy_only --out_dir=out/std_rl_janus
backbone = "janus"
prepare = "data/shapes/prepare.py --out=out/shapes --backbone=janus"
gpt_ckpt = "out/shapes/janus"  # the policy, its tokenizer and generation config
vq_ckpt = "out/shapes/janus"  # its VQ: the world's VQ-micro, under Janus's names
vq_model = "VQ-micro"
janus_prompt_len = 24
out_dir = "out/ranke_janus"
