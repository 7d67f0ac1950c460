# speedrun.sh (October 2025): base training
# From https://github.com/karpathy/nanochat/blob/fe5aed940baefa7c5d1ca9b27d3c68e1f5e52a8c/speedrun.sh#L95
torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20 --run=$WANDB_RUN
