"""Llama-3-8B shape: 8.03B parameters, GQA with 8 kv heads, vocab 128256, rope theta 500000.

    python -m jaxllm.main --config=configs/8b.py --workdir=/ckpt/8b \
        --config.data.source_dir=/data/text --config.data.tokenizer=/data/spm.model

Mesh: (data, fsdp, tensor) = (1, all devices, 1), e.g. fsdp=8 on 8 H100s or H200s; with
tensor parallelism keep mesh.tensor <= 8 so the 8 kv heads divide it. Global batch 64 rows x 8192
tokens = 524,288 tokens a step; full remat.
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.apply_size(config_lib.base_config(), 'llama3-8b')
  c.name = '8b'
  return config_lib.accelerator_recipe(c, seq_len=8192, global_batch_size=64, remat='full',
                                       num_steps=50_000, warmup_steps=2_000)
