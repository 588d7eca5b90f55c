"""Fine-tune the README's tiny model (`runs/tiny`, configs/tiny.py) on the built-in chat demo:
conversations made from the embedded plays, the loss on the assistant's turns only, rendered with
jaxllm's default chat template (the tiny model's sentencepiece tokenizer has none of its own).

    python -m jaxllm.main --config=configs/tiny.py                          # runs/tiny, first
    python -m jaxllm.main --config=configs/tiny_chat.py                     # runs/tiny_chat
    python -m jaxllm.sample --workdir=runs/tiny_chat --chat="My lord, the king is dead." --temperature=0

Paths are relative to the directory the commands run in. Expect about a minute on 2 CPU cores
and held-out loss on assistant tokens falling from 4.99 to about 4.52 (docs/benchmarks.md).
"""

from jaxllm import config as config_lib


def get_config():
  c = config_lib.apply_size(config_lib.base_config(), 'tiny')  # configs/tiny.py's model
  c.name = 'tiny_chat'
  c.checkpoint.init_from = 'runs/tiny/checkpoints'  # the parameters only; a new optimizer
  c.data.tokenizer = 'runs/tiny/tokenizer.model'  # the model's own, never a new one
  c.data.sources = 'builtin:shakespeare_chat'
  c.data.chat_template = 'default'
  c.data.eval_files = 2  # two plays' conversations held out
  c.data.seq_len = 128
  c.train.global_batch_size = 16
  c.train.num_steps = 300
  c.train.eval_every = 100
  c.train.sample_prompts = ()  # raw-text prompts do not suit a chat model
  c.optim.update(peak_lr=3e-4, warmup_steps=10, weight_decay=0.0)
  return c
