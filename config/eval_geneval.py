# GenEval (553 prompts x 4 images) on a run's rounds, scored by eval.py's port of the official scorer
# (transformers' Mask2Former Swin-S for instances, CLIP ViT-L/14 for colours):
#   torchrun --nproc_per_node=8 eval.py config/eval_geneval.py --run=out/llamagen_xl_clip --eval_rounds=0,600
# Images made elsewhere, in GenEval's own folder layout:
#   python eval.py config/eval_geneval.py --geneval_images=path/to/geneval_outputs
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's prompts (MIT licence, djghosh13/geneval)
eval_specs = "data/geneval/evaluation_metadata.jsonl"  # ... and what each image must hold
eval_pairs = ""  # no real images: GenEval reports no FID
geneval_detector = "pretrained_models/mask2former-swin-small-coco-instance"  # facebook/mask2former-swin-small-coco-instance
geneval_clip_model = "ViT-L-14"
geneval_clip_weights = "pretrained_models/open_clip_vit_l_14_openai.pt"
geneval_clip_quick_gelu = True
eval_n_per_prompt = 4
eval_batch_size = 32
eval_cfg_scale = 7.5  # LlamaGen's sampling (the authors' release samples GenEval at 6.0)
eval_temperature = 1.0
eval_top_k = 1000
eval_top_p = 1.0
