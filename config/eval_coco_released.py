# COCO-30K sampled as the authors' release samples it (autoregressive/sample/sample_t2i_ddp.py, run by
# scripts/sample_llamagen/sample_clip_coco.sh): CFG 6.0, top-k 1000, top-p 1.0, temperature 1.0, T5 features
# right-padded with every pad zeroed, the last slot too (`caption_embs * emb_masks`); the rest is
# config/eval_coco.py. Images of these settings land in their own folder, beside the paper protocol's.
#   torchrun --nproc_per_node=8 eval.py config/eval_coco_released.py --run=out/released_llamagen_xl_clip
import os
exec(open(os.path.join(os.path.dirname(__file__), "eval_coco.py")).read())
eval_cfg_scale = 6.0
eval_top_k = 1000
eval_top_p = 1.0
eval_temperature = 1.0
eval_caption_padding = "right_zeroed"
