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
  c.model.dtype = 'bfloat16'
  c.model.remat = 'full'
  c.model.attention = 'auto'  # cuDNN flash attention where available, else XLA
  c.data.seq_len = 8192
  c.train.global_batch_size = 64
  c.train.num_steps = 50_000
  c.train.log_every = 10
  c.train.eval_every = 1000
  c.optim.peak_lr = 3e-4
  c.optim.warmup_steps = 2000
  return c
