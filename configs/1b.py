"""Llama-3.2-1B shape (1.24B parameters, tied embeddings, GQA 32/8), bf16 compute.

    python -m jaxllm.main --config=configs/1b.py --workdir=/ckpt/1b \
        --config.data.source_dir=/data/text --config.data.tokenizer=/data/spm.model

Mesh: (data, fsdp, tensor) = (1, all devices, 1), e.g. fsdp=8 on one 8-GPU host. Global batch
64 rows x 4096 tokens = 262,144 tokens a step (8 rows per device on 8 devices).
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.apply_size(config_lib.base_config(), 'llama3.2-1b')
  c.name = '1b'
  return config_lib.accelerator_recipe(c, seq_len=4096, global_batch_size=64, remat='save_dots',
                                       num_steps=20_000, warmup_steps=1_000)
