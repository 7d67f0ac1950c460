# Seed 002: the stable d16 run on two RTX 5090D (device_batch_size=10, max_seq_len=1536,
# total_batch_size=30720), as nanochat's configurator flags of October 2025.
torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- --depth=16 --device_batch_size=10 --max_seq_len=1536 --total_batch_size=30720 --run=dual_gpu_stable_success
