# The HPSv2 benchmark (with COCO-30K) sampled as the authors' release samples it
# (autoregressive/sample/sample_t2i_ddp_hpsv2.py, scripts/sample_llamagen/sample_hpsv2.sh): one image a
# prompt, CFG 6.0, top-k 1000, right padding with every pad zeroed; HPS v2.1 scores each style.
# The benchmark's prompt files (anime, concept-art, paintings, photo; HPDv2's benchmark/ folder, named
# <style>.json or benchmark_<style>.json) go in data/hpsv2_benchmark/.
#   torchrun --nproc_per_node=8 eval.py config/eval_hpsv2_released.py --run=out/released_llamagen_xl_hpsv2
# Not reproduced: the release saves these images as JPEG (quality 100) before scoring; here they are PNGs.
import os
exec(open(os.path.join(os.path.dirname(__file__), "eval_coco_released.py")).read())
eval_hps_weights = "pretrained_models/HPS_v2.1_compressed.pt"
eval_hps_benchmark = "data/hpsv2_benchmark"
