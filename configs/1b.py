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
  c.model.dtype = 'bfloat16'
  c.model.remat = 'save_dots'
  c.model.attention = 'auto'  # cuDNN flash attention where available, else XLA
  c.data.seq_len = 4096
  c.data.eval_files = 2
  c.train.global_batch_size = 64
  c.train.num_steps = 20_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.optim.peak_lr = 3e-4
  c.optim.warmup_steps = 1000
  return c
