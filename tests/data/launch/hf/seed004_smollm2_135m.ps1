# Seed 004 (SmolLM2-135M SFT on an RTX 4060 Laptop, 8 GB): strategy A, as the report writes it (PowerShell)
python train_hw_parallel.py `
    --model_name_or_path SmolLM2-135M `
    --data_path smol-smoltalk-6k.json `
    --output_dir ckpt/HW2-4060-8GB `
    --num_train_epochs 5 `
    --per_device_train_batch_size 1 `
    --gradient_accumulation_steps 64 `
    --learning_rate 4e-5 `
    --warmup_ratio 0.2 `
    --model_max_length 1024 `
    --fp16 True `
    --gradient_checkpointing True `
    --save_steps 20 `
    --logging_steps 1 `
    --max_rounds 6
