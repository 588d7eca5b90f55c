"""Every configuration key, declared once, plus the model-size table and cross-field checks.

Configs in `configs/` are small deltas on `base_config()`. Loaded with
`config_flags.DEFINE_config_file(lock_config=True)`, so `--config.model.n_layerz=2` fails loudly.
This module imports no jax, flax or other jaxllm module: it is plain data.
"""

from __future__ import annotations

import ml_collections

# Published shapes. `source` is where each number was read. Llama 3.1+ checkpoints also carry
# rope scaling (model.rope_scaling='llama3'), set by tools/convert_from_hf.py when importing them.
MODEL_SIZES = {
    # Ours: the CPU default, small enough to train in minutes on 2 cores.
    'tiny': dict(source='jaxllm (this repo): CPU smoke/default model',
                 vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=32,
                 mlp_dim=384, rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False),
    'llama3.2-1b': dict(source='meta-llama/Llama-3.2-1B config.json (HF model card)',
                        vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, mlp_dim=8192, rope_theta=500_000.0, norm_eps=1e-5,
                        tie_embeddings=True),
    'llama2-7b': dict(source='Touvron et al. 2023, Llama 2, Table 1; the config.json of '
                             'meta-llama/Llama-2-7b-hf',
                      vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, mlp_dim=11_008, rope_theta=10_000.0, norm_eps=1e-5,
                      tie_embeddings=False),
    'llama3-8b': dict(source='Meta 2024, The Llama 3 Herd of Models, Table 3; '
                             'meta-llama/Meta-Llama-3-8B config.json',
                      vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      head_dim=128, mlp_dim=14_336, rope_theta=500_000.0, norm_eps=1e-5,
                      tie_embeddings=False),
}

# Logical axis name -> mesh axis (or axes). One-to-one: Flax NNX applies it as a rename.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
)


# Keys that may be 'auto': resolved at the start of a training run by the planner (jaxllm/aot.py,
# `resolve_auto`) to the largest per-device batch and cheapest remat whose compiled step fits
# train.hbm_gib, and written resolved into the run's config.json (a resume reuses them).
AUTO = 'auto'
AUTO_KEYS = ('train.global_batch_size', 'train.microbatches', 'model.remat')


def _int_or_auto(value: int) -> ml_collections.FieldReference:
  return ml_collections.FieldReference(value, field_type=object)


def auto_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The AUTO_KEYS set to 'auto' in `config`."""
  return [key for key in AUTO_KEYS if config[key.split('.')[0]][key.split('.')[1]] == AUTO]


def base_config() -> ml_collections.ConfigDict:
  """All keys with their defaults; each line says what the key means and its unit."""
  c = ml_collections.ConfigDict()
  c.name = 'base'  # run name; the default workdir is runs/<name>
  c.seed = 0  # seeds parameter init (data has its own seed below)

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 2048  # embedding rows; must be >= the tokenizer's vocabulary
  m.d_model = 128  # residual width D
  m.n_layers = 4  # decoder layers
  m.n_heads = 4  # query heads H
  m.n_kv_heads = 4  # key/value heads K (GQA when K < H; H % K == 0)
  m.head_dim = 32  # per-head width Dh
  m.mlp_dim = 384  # SwiGLU hidden width F
  m.rope_theta = 10_000.0  # RoPE base frequency
  m.norm_eps = 1e-5  # RMSNorm epsilon
  m.tie_embeddings = False  # share embed_tokens with the output head
  m.init_std = 0.02  # std of the normal init of every matrix
  m.param_dtype = 'float32'  # parameter (and optimizer moment) storage dtype
  m.dtype = 'float32'  # compute dtype: 'bfloat16' on accelerators; logits and loss stay float32
  m.remat = 'none'  # activation recompute: none | full | save_dots | save_all_dots | auto (AUTO_KEYS)
  m.scan_layers = True  # scan over stacked layers (compile time independent of depth)
  m.attention = 'xla'  # kernel: xla | cudnn | pallas | auto (cuDNN on bf16 GPUs, splash on TPU)
  m.attention_max_segments = 0  # packed cuDNN: segments per row planned for; 0 = max(16, seq_len/256)
  m.fp8 = False  # q/k/v/o and MLP matmuls in float8, scaled per tensor (jaxllm/fp8.py)
  m.gather_in_compute_dtype = False  # FSDP all-gathers weights in model.dtype, not param_dtype
  # Llama-family variants (jaxllm/convert/hf.py sets these when importing a Hugging Face model).
  m.qkv_bias = False  # biases on the q/k/v projections (Qwen2)
  m.o_bias = False  # bias on the attention output projection (Llama/Qwen3 attention_bias=True)
  m.qk_norm = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3)
  m.sliding_window = 0  # attend to the last this many tokens (self included); 0 = all (Mistral)
  m.rope_scaling = 'none'  # none | llama3 (Llama 3.1+ context extension of RoPE)
  m.rope_scaling_factor = 8.0  # llama3: factor by which low frequencies are stretched
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths over rope_original_max_len / this are stretched
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths below rope_original_max_len / this are kept
  m.rope_original_max_len = 8192  # llama3: pre-training context length in tokens

  c.data = d = ml_collections.ConfigDict()
  d.source_dir = ''  # directory of .txt files; '' = the corpus shipped in the package
  d.sources = ''  # 'SPEC[@WEIGHT],...': dirs/globs/files of .txt/.jsonl/.parquet or tfds:NAME:SPLIT
  d.eval_source = ''  # a SPEC read whole for eval; '' = eval_files whole files of the first source
  d.text_field = 'text'  # jsonl field, parquet column or TFDS feature that holds the text
  d.tfds_data_dir = ''  # where tfds:NAME:SPLIT datasets are prepared (array_record); '' = TFDS default
  d.skip_bad_records = False  # skip, count and log bad files/records instead of failing
  d.pretokenize = False  # train from token ids cached under <cache_dir>/tokens (tools/prepare_data.py)
  d.worker_count = 0  # grain worker processes (resume stays exact; batch order differs from 0)
  d.cache_dir = ''  # where the array_record dataset is built; '' = <workdir>/data
  d.tokenizer = ''  # sentencepiece model (must exist); '' = <workdir>/tokenizer.model, trained if missing
  d.eval_files = 2  # whole source files held out for evaluation
  d.eval_fraction = 0.0  # > 0: hold out this fraction of the first source's documents instead (one file)
  d.seq_len = 256  # tokens per row (packed documents)
  # Conversations (jsonl rows with `messages`, or `prompt` and `completion`): jaxllm/chat.py.
  d.chat_template = ''  # Jinja file, or 'default' (jaxllm's); '' = the tokenizer's own template
  d.loss_on = 'assistant'  # conversations: assistant | all (tokens that carry loss)
  d.chat_overflow = 'drop'  # a conversation longer than seq_len: drop | truncate (counted, logged)
  d.seed = 0  # shuffling seed

  c.train = t = ml_collections.ConfigDict()
  # These two may also be 'auto' (AUTO_KEYS): typed `object` so a flag can say either.
  t.global_batch_size = _int_or_auto(16)  # rows per optimizer step, over all devices and micro-batches
  t.microbatches = _int_or_auto(1)  # gradient accumulation: the step's batch is split into this many
  t.hbm_gib = 0.0  # per-device memory budget of 'auto' settings and jaxllm.tune; 0 = the devices' own
  t.loss_chunk = 0  # > 0: head + loss fused over this many positions at a time (no full logits)
  t.microbatch_gather = 'per_micro'  # FSDP gathers with micro-batches: per_micro | once (params held whole)
  t.num_steps = 300  # optimizer steps
  t.log_every = 25  # steps between console/TensorBoard lines
  t.layer_stats_every = 0  # steps between per-layer param/grad/update norms to TensorBoard; 0 = off
  t.eval_every = 100  # steps between held-out evaluations (and at the end); 0 = only at the end
  t.eval_batches = 8  # held-out batches per evaluation (0 = the whole eval split)
  t.sample_prompts = ('ROMEO:', 'To be, or not')  # prompts sampled at each eval (TensorBoard text)
  t.sample_tokens = 48  # tokens generated per prompt at each eval; 0 = no samples
  t.sample_temperature = 0.8  # sampling temperature of the eval samples; 0 = greedy
  t.xla_gpu_flags = True  # add jaxllm's XLA GPU flags (see runtime.GPU_XLA_FLAGS) to XLA_FLAGS
  t.cpu_reuse_memory = True  # CPU backend: keep freed host memory for the next step (runtime.py)
  t.cpu_fusion_emitters = False  # CPU: XLA's MLIR fusion emitters (slower compile; runtime.py)

  c.optim = o = ml_collections.ConfigDict()
  o.peak_lr = 3e-3  # learning rate after warmup
  o.warmup_steps = 30  # linear warmup from 0 to peak_lr
  o.decay_steps = 0  # steps of cosine decay after warmup; 0 = until train.num_steps
  o.final_lr_fraction = 0.1  # cosine ends at peak_lr x this
  o.b1 = 0.9  # AdamW first-moment decay
  o.b2 = 0.95  # AdamW second-moment decay
  o.eps = 1e-8  # AdamW epsilon
  o.weight_decay = 0.1  # decoupled weight decay (matrices only; not norms or other 1-D params)
  o.clip_norm = 1.0  # global gradient-norm clip; 0 = off
  o.shard_over_data = False  # ZeRO-1: AdamW moments also split over mesh.data (params replicated there)
  o.skip_nonfinite = 0  # skip updates with a non-finite loss/gradient, at most this many in a row; 0 = stop

  c.checkpoint = k = ml_collections.ConfigDict()
  k.dir = ''  # where checkpoints go ('' = <workdir>/checkpoints); a restart resumes from the latest
  k.every = 100  # steps between async saves; also at the end and on SIGTERM/SIGINT (0: only then)
  k.keep_latest = 3  # the newest checkpoints kept; older ones are deleted unless kept by keep_every
  k.keep_every = 0  # steps that are multiples of this are kept for good; 0 = none
  k.async_save = True  # write in a background thread; the loop waits only for the host copy
  k.init_from = ''  # another run's checkpoint dir: take only its parameters (new optimizer, step 0)
  k.init_from_step = -1  # the step of checkpoint.init_from to read; -1 = its latest
  k.restore_data = True  # resume the data position too; False: state only, data order restarted at the step

  c.distill = ds = ml_collections.ConfigDict()  # knowledge distillation (jaxllm/loss.py kd_sum)
  ds.teacher = ''  # a frozen teacher's run directory (a jaxllm.main --workdir or an HF import); '' = off
  ds.teacher_step = -1  # the teacher checkpoint step to read; -1 = its latest
  ds.alpha = 0.5  # loss = alpha T^2 KL(teacher || student, at T) + (1 - alpha) cross entropy
  ds.temperature = 1.0  # softmax temperature T of both models in the KL term (> 0)
  ds.teacher_dtype = 'bfloat16'  # the teacher's parameter and compute dtype: bfloat16 | float32

  c.ptq = q = ml_collections.ConfigDict()  # post-training weight quantization (jaxllm/ptq.py)
  q.format = ''  # '' = float; int8 (per output channel) | int4 (per group): a quantized run, not trained
  q.group_size = 64  # int4: input rows per scale (must divide every matrix's input width)

  c.lora = lo = ml_collections.ConfigDict()  # jaxllm/lora.py: adapters on a frozen base
  lo.rank = 0  # adapter rank r; 0 = off (every parameter trains); > 0 needs checkpoint.init_from
  lo.alpha = 16.0  # the update is (alpha / rank) x (x @ A) @ B, as PEFT scales it
  lo.dropout = 0.0  # dropout on each adapter's input, in training only
  lo.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # projections that get an adapter
  lo.base_dtype = ''  # storage dtype of the frozen base: float32 | bfloat16; '' = model.param_dtype
  lo.quantize = 'none'  # the base's seven projections stored as none | int8 | int4 (QLoRA)
  lo.group_size = 64  # int4: input rows per float scale
  lo.adapter = ''  # a PEFT adapter folder (adapter_config.json) to start the adapters from

  c.monitor = mon = ml_collections.ConfigDict()  # jaxllm/monitor.py; keys are Monitor's arguments
  mon.prometheus_port = 0  # serve Prometheus /metrics on this port (process i: port + i); 0 = off
  mon.prometheus_host = '127.0.0.1'  # interface the endpoint binds; '0.0.0.0' = every interface
  mon.goodput_flush_seconds = 10.0  # seconds between writes of <workdir>/goodput.json; 0 = per step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # pure data parallelism (replicated parameters)
  c.mesh.fsdp = -1  # data parallelism with parameters sharded (ZeRO-3); -1 = the remaining devices
  c.mesh.tensor = 1  # tensor parallelism over heads, mlp and vocab
  # The three sizes above are per slice (one host, or one TPU slice: fast ICI/NVLink links).
  # Across slices (DCN, the data-centre network), each of these multiplies its axis:
  c.mesh.dcn_data = 1  # slices doing data parallelism (total data axis = data x dcn_data)
  c.mesh.dcn_fsdp = 1  # slices sharing FSDP shards (total fsdp axis = fsdp x dcn_fsdp)

  c.distributed = ml_collections.ConfigDict()
  # auto: join a multi-process job when a launcher is detected (SLURM with several tasks, Open MPI,
  # a Kubernetes indexed job) or a coordinator is given; always: let JAX detect the cluster (TPU
  # pods); never: one process.
  c.distributed.initialize = 'auto'
  c.distributed.coordinator_address = ''  # host:port of process 0; '' = auto-detect (see README)
  c.distributed.num_processes = 0  # processes in the job; 0 = auto-detect
  c.distributed.process_id = -1  # this process's index; -1 = auto-detect

  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = DEFAULT_RULES  # logical axis name -> mesh axis, one-to-one
  return c


def apply_size(config: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
  """Sets the model shape from a MODEL_SIZES row."""
  if size not in MODEL_SIZES:
    raise ValueError(f'unknown model size {size!r}; known: {sorted(MODEL_SIZES)}')
  config.model.update({k: v for k, v in MODEL_SIZES[size].items() if k != 'source'})
  return config


def accelerator_recipe(config: ml_collections.ConfigDict, *, seq_len: int, global_batch_size: int,
                       remat: str, num_steps: int, warmup_steps: int,
                       peak_lr: float = 3e-4) -> ml_collections.ConfigDict:
  """What the GPU/TPU configs share: bf16 compute over float32 parameters, cuDNN flash attention
  where available, a remat policy, AdamW at `peak_lr` with warmup, logs every 10 steps."""
  config.model.update(dtype='bfloat16', remat=remat, attention='auto')
  config.data.seq_len = seq_len
  config.train.update(global_batch_size=global_batch_size, num_steps=num_steps, log_every=10,
                      eval_every=1000)
  config.optim.update(peak_lr=peak_lr, warmup_steps=warmup_steps)
  return config


# The smallest valid value of each numeric key that has one (the others are checked below).
MINIMUMS = {
    'model.vocab_size': 1, 'model.d_model': 1, 'model.n_layers': 1, 'model.n_heads': 1,
    'model.n_kv_heads': 1, 'model.head_dim': 2, 'model.mlp_dim': 1, 'model.sliding_window': 0,
    'model.norm_eps': 0, 'model.rope_theta': 1,
    'data.seq_len': 2, 'data.worker_count': 0, 'data.eval_files': 0,
    'train.global_batch_size': 1, 'train.microbatches': 1, 'train.loss_chunk': 0,
    'train.num_steps': 1, 'train.log_every': 1, 'train.eval_every': 0, 'train.eval_batches': 0,
    'train.layer_stats_every': 0,
    'train.sample_tokens': 0, 'train.sample_temperature': 0,
    'optim.peak_lr': 0, 'optim.warmup_steps': 0, 'optim.decay_steps': 0, 'optim.eps': 0,
    'optim.weight_decay': 0, 'optim.clip_norm': 0, 'optim.skip_nonfinite': 0,
    'checkpoint.every': 0, 'checkpoint.keep_latest': 1, 'checkpoint.keep_every': 0,
    'mesh.dcn_data': 1, 'mesh.dcn_fsdp': 1,
    'lora.rank': 0, 'lora.group_size': 2,
    'monitor.prometheus_port': 0, 'monitor.goodput_flush_seconds': 0, 'train.hbm_gib': 0,
}


# Keys whose value is one of a few names.
CHOICES = {'data.loss_on': ('assistant', 'all'), 'data.chat_overflow': ('drop', 'truncate'),
           'distill.teacher_dtype': ('bfloat16', 'float32'), 'ptq.format': ('', 'int8', 'int4'),
           'lora.quantize': ('none', 'int8', 'int4'), 'lora.base_dtype': ('', 'float32', 'bfloat16'),
           'train.microbatch_gather': ('per_micro', 'once')}
LORA_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _unresolved(key: str) -> str:
  return (f"{key}='auto' is resolved only when a training run starts (jaxllm.main, jaxllm.tune; "
          "tools/aot_compile.py --plan prints the choice): set a value here")


def _below_minimum(config: ml_collections.ConfigDict) -> list[str]:
  errors = []
  for key, least in MINIMUMS.items():
    section, name = key.split('.')
    value = config[section][name]
    if value == AUTO and key in AUTO_KEYS:
      errors.append(_unresolved(key))
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
      errors.append(f'{key}={value!r} must be a number')
    elif value < least:
      errors.append(f'{key}={value} must be >= {least}')
  return errors


def check_minimums(config: ml_collections.ConfigDict) -> None:
  """The checks that need no mesh (every MINIMUMS key), for tools that build no trainer."""
  if errors := _below_minimum(config):
    raise ValueError('invalid config: ' + '; '.join(errors))


def validate(config: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
  """Cross-field checks; each error names the keys to change. `mesh_shape` is resolved."""
  m, t = config.model, config.train
  errors = _below_minimum(config)
  if m.remat == AUTO:
    errors.append(_unresolved('model.remat'))
  if not config.data.eval_source and config.data.eval_files < 1 and not config.data.eval_fraction:
    errors.append('data.eval_files=0 leaves no held-out split: set it >= 1, or set '
                  'data.eval_fraction or data.eval_source')
  if not 0 <= config.distill.alpha <= 1 or not config.distill.temperature > 0:
    errors.append(f'distill.alpha={config.distill.alpha} must be in [0, 1] and distill.temperature='
                  f'{config.distill.temperature} > 0')
  if not 0 <= config.data.eval_fraction < 1:
    errors.append(f'data.eval_fraction={config.data.eval_fraction} must be in [0, 1)')
  for key, allowed in CHOICES.items():
    section, name = key.split('.')
    if config[section][name] not in allowed:
      errors.append(f'{key}={config[section][name]!r} must be one of {", ".join(allowed)}')
  if errors:  # the checks below divide by these values
    raise ValueError('invalid config: ' + '; '.join(errors))
  if m.n_heads % m.n_kv_heads:
    errors.append(f'model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}')
  tensor = mesh_shape['tensor']
  for key in ('n_heads', 'n_kv_heads', 'mlp_dim', 'vocab_size'):
    if m[key] % tensor:
      errors.append(f'model.{key}={m[key]} is not divisible by mesh.tensor={tensor}')
  if m.d_model % mesh_shape['fsdp']:
    errors.append(f'model.d_model={m.d_model} is not divisible by mesh.fsdp={mesh_shape["fsdp"]}')
  if m.head_dim % 2:
    errors.append(f'model.head_dim={m.head_dim} must be even for RoPE')
  batch_ways = mesh_shape['data'] * mesh_shape['fsdp']
  if t.global_batch_size % t.microbatches:
    errors.append(f'train.global_batch_size={t.global_batch_size} is not divisible by '
                  f'train.microbatches={t.microbatches}')
  elif (t.global_batch_size // t.microbatches) % batch_ways:
    errors.append(f'train.global_batch_size={t.global_batch_size} / train.microbatches='
                  f'{t.microbatches} must be divisible by mesh.data x mesh.fsdp = {batch_ways}')
  if t.loss_chunk and config.data.seq_len % t.loss_chunk:
    errors.append(f'train.loss_chunk={t.loss_chunk} must be 0 or divide data.seq_len='
                  f'{config.data.seq_len}')
  errors += _lora_errors(config)
  if t.microbatch_gather == 'once' and (config.lora.rank or config.distill.teacher):
    errors.append("train.microbatch_gather='once' gathers the trained parameters only; with "
                  f"lora.rank={config.lora.rank} / distill.teacher={config.distill.teacher!r} the "
                  "frozen base or teacher would still be gathered per micro-batch: use 'per_micro'")
  o = config.optim
  if o.shard_over_data and mesh_shape['data'] == 1:
    errors.append('optim.shard_over_data splits the AdamW moments over mesh.data, which is 1 here '
                  '(mesh.fsdp already splits them): set mesh.data (or mesh.dcn_data) > 1, or leave '
                  'it off')
  if o.decay_steps == 0 and o.warmup_steps >= t.num_steps:
    errors.append(f'optim.warmup_steps={o.warmup_steps} leaves no steps of decay before '
                  f'train.num_steps={t.num_steps}; lower it or set optim.decay_steps > 0')
  if errors:
    raise ValueError('invalid config: ' + '; '.join(errors))


def _lora_targets(targets) -> tuple[str, ...]:
  """As lora.parse_targets (this module imports no jaxllm module): 'q,v' or ('q', 'v')."""
  items = (targets,) if isinstance(targets, str) else tuple(targets)
  return tuple(t.strip() for item in items for t in str(item).split(',') if t.strip())


def _lora_errors(config: ml_collections.ConfigDict) -> list[str]:
  """lora.* (checked whatever lora.rank is: a bad value is a typo either way) and its mixes."""
  lo, m, errors = config.lora, config.model, []
  if isinstance(lo.alpha, bool) or not isinstance(lo.alpha, (int, float)) or not lo.alpha > 0:
    errors.append(f'lora.alpha={lo.alpha!r} must be > 0 (the update is scaled by alpha / rank; '
                  'rank or 2 x rank is usual)')
  if isinstance(lo.dropout, bool) or not isinstance(lo.dropout, (int, float)) \
      or not 0 <= lo.dropout < 1:
    errors.append(f'lora.dropout={lo.dropout!r} must be in [0, 1) (0 = off; 0.05 is usual)')
  targets = _lora_targets(lo.targets) if isinstance(lo.targets, (str, tuple, list)) else ()
  if unknown := [t for t in targets if t not in LORA_TARGETS]:
    errors.append(f'lora.targets={lo.targets!r}: {", ".join(map(repr, unknown))} is not a '
                  f'projection; choose among {", ".join(LORA_TARGETS)} (--config.lora.targets=q,v)')
  elif not targets:
    errors.append(f'lora.targets={lo.targets!r} names no projection: choose among '
                  f'{", ".join(LORA_TARGETS)} (--config.lora.targets=q,v)')
  if lo.rank == 0:
    if lo.quantize != 'none':
      errors.append(f'lora.quantize={lo.quantize!r} quantizes the frozen base of adapters: set '
                    'lora.rank > 0 (16 is usual), or ptq.format to quantize a trained model')
    if lo.adapter:
      errors.append(f'lora.adapter={lo.adapter} needs adapters to load into: set lora.rank (and '
                    "lora.alpha, lora.targets) to the adapter's r (lora_alpha, target_modules) "
                    'in its adapter_config.json')
    return errors
  if config.ptq.format:
    errors.append(f'ptq.format={config.ptq.format!r} and lora.rank={lo.rank} do not combine: '
                  'ptq.format marks a trained model quantized for evaluation; to train adapters '
                  f"on a quantized base set lora.quantize={config.ptq.format} and ptq.format=''")
  if lo.quantize == 'int4':
    widths = {'model.d_model': m.d_model, 'model.mlp_dim': m.mlp_dim,
              'model.n_heads x model.head_dim': m.n_heads * m.head_dim}
    for key, width in widths.items():
      if lo.group_size % 2 or width % lo.group_size:
        errors.append(f'lora.group_size={lo.group_size} must be even and divide {key}={width}')
        break
  return errors
