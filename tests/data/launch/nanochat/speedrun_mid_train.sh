# speedrun.sh (October 2025): midtraining
# From https://github.com/karpathy/nanochat/blob/fe5aed940baefa7c5d1ca9b27d3c68e1f5e52a8c/speedrun.sh#L109
torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --run=$WANDB_RUN
