# GenEval sampled as the authors' release samples it (autoregressive/sample/sample_t2i_ddp_geneval.py, run
# by scripts/sample_llamagen/sample_clip_geneval.sh): CFG 6.0, top-k 1000, top-p 1.0, 4 images a prompt,
# T5 features left-padded (LlamaGen's layout: pads zero) whatever the run trained with. Its own folders
# (NNNNN/samples/NNNNN.png, five digits) score with --geneval_images as GenEval's four-digit ones do.
#   torchrun --nproc_per_node=8 eval.py config/eval_geneval_released.py --run=out/released_llamagen_xl_clip
import os
exec(open(os.path.join(os.path.dirname(__file__), "eval_geneval.py")).read())
eval_cfg_scale = 6.0
eval_caption_padding = "left"
