"""Llama-2-7B shape: 6,738,415,616 parameters, 32 layers, width 4096, MHA, vocab 32000.

    python -m jaxllm.main --config=configs/7b.py --workdir=/ckpt/7b \
        --config.data.source_dir=/data/text --config.data.tokenizer=/data/spm.model

Mesh: (data, fsdp, tensor) = (1, all devices, 1): FSDP over every chip, e.g. fsdp=8 on 8 H100s
(params + AdamW moments in float32 = 12 bytes x 6.74e9 / 8 = 9.4 GiB per device). For several
hosts, set mesh.data to the number of hosts and mesh.fsdp=-1. Global batch 64 rows x 4096
tokens = 262,144 tokens a step; full remat.
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.apply_size(config_lib.base_config(), 'llama2-7b')
  c.name = '7b'
  return config_lib.accelerator_recipe(c, seq_len=4096, global_batch_size=64, remat='full',
                                       num_steps=50_000, warmup_steps=2_000)
