"""The shape ../shared/bench/ times for MaxText 0.2.5 and HF transformers on this CPU, for a
side-by-side ratio: hidden 256, 4 layers, 8 heads of 32, SwiGLU 1024, vocab 32000 (untied),
seq 256, global batch 8, float32, AdamW (b1 0.9, b2 0.95, eps 1e-8, wd 0.1, clip 1.0).

    python tools/benchmark.py --config=configs/peer_cpu.py --steps=25 --warmup=5 --peer_line

Mesh: every device present on fsdp (1 on a plain CPU process).
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.name = 'peer_cpu'
  c.model.update(vocab_size=32_000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=32,
                 mlp_dim=1024, tie_embeddings=False)
  c.data.seq_len = 256
  c.train.global_batch_size = 8
  c.optim.update(peak_lr=3e-4, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                 clip_norm=1.0)
  return c
