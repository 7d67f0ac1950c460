# transformers examples/pytorch/language-modeling/README.md: GPT-2 on WikiText-2
# From https://github.com/huggingface/transformers/blob/00aff44a1d63c9017ee0da9308ad4b7ba045bbf9/examples/pytorch/language-modeling/README.md
python run_clm.py \
    --model_name_or_path gpt2 \
    --dataset_name wikitext \
    --dataset_config_name wikitext-2-raw-v1 \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --do_train \
    --do_eval \
    --output_dir /tmp/test-clm
