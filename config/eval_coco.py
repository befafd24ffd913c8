# The paper's COCO-30K protocol (Sec. 4.1) for a LlamaGen-XL run:
#   torchrun --nproc_per_node=8 eval.py config/eval_coco.py --run=out/llamagen_xl_clip --eval_rounds=0,600
eval_prompts = "data/coco_captions_30k.csv"
eval_pairs = "data/coco_val2014"  # every COCO val2014 image (a folder): the FID reference and the real codes
eval_specs = ""  # GenEval needs a detector that cannot be downloaded here
feature_net = "pretrained_models/inception-2015-12-05.pt"  # clean-fid's TorchScript Inception
feature_size = 299  # clean-fid's "clean" resize (its package): PIL bicubic on float32 channels
fid_crop = 256  # both sets centre-cropped and LANCZOS-resized to 256 first (LlamaGen's evaluation.py, the release)
eval_clip_model = "ViT-B-32"  # LlamaGen's evaluation CLIP, OpenAI weights
eval_clip_weights = "pretrained_models/open_clip_vit_b_32_openai.pt"
eval_clip_quick_gelu = True
eval_clip_prefix = "A photo depicts "
eval_hps_weights = ""  # pretrained_models/HPS_v2.1_compressed.pt to add HPSv2
eval_n_per_prompt = 1
eval_batch_size = 64
eval_cfg_scale = 7.5  # LlamaGen's COCO sampling
eval_temperature = 1.0
eval_top_k = 1000
eval_top_p = 1.0
