"""The CPU default: a 1.3M-parameter Llama trained on the embedded Shakespeare corpus.

    python -m jaxllm.main --config=configs/tiny.py --workdir=runs/tiny

Mesh: fsdp over every device present (1 on a plain CPU; 8 with
XLA_FLAGS=--xla_force_host_platform_device_count=8). Expect a few minutes on 2 CPU cores and a
held-out loss well below the corpus's unigram entropy (README, "Results").
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.apply_size(config_lib.base_config(), 'tiny')
  c.name = 'tiny'
  c.data.seq_len = 128
  c.train.global_batch_size = 16  # 16 rows x 128 tokens = 2,048 tokens a step
  c.train.num_steps = 600  # 1.2M tokens, about 3 minutes on 2 cores
  c.train.eval_every = 200
  return c
