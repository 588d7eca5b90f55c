"""Knowledge distillation's frozen teacher (config `distill`): its model, read from a run
directory (a jaxllm.main workdir or a tools/convert_from_hf.py import), the check that it
tokenizes as the student does, and the distillation objective of one batch. The objective
itself is `loss.kd_sum` / `loss.head_kd_sum`; `jaxllm/trainer.py` carries the teacher's
parameters in the train state (`state['teacher']`: handed through each step unchanged, never
saved, no optimizer state), so the loop stays as it is and the AOT planner counts their bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from jaxllm import loss as loss_lib
from jaxllm import model as model_lib
from jaxllm import rundir


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The frozen model, in `model_cfg`'s dtype on the student's mesh."""

  graphdef: nnx.GraphDef
  model_cfg: model_lib.ModelConfig
  workdir: str  # distill.teacher: a run directory
  step: int  # distill.teacher_step; -1 = the latest
  alpha: float
  temperature: float


def teacher_model(config: ml_collections.ConfigDict,
                  student: model_lib.ModelConfig) -> model_lib.ModelConfig | None:
  """The teacher's model (None unless distill.teacher is set): the shape its run was saved
  with, parameters and compute in distill.teacher_dtype, the student's attention kernel and
  layer scan, no remat (it is never differentiated)."""
  d = config.distill
  if not d.teacher:
    return None
  try:
    saved = rundir.RunDir(d.teacher).load_config()
  except FileNotFoundError:
    raise FileNotFoundError(f'distill.teacher={d.teacher!r} has no config.json: pass the --workdir '
                            'of a jaxllm.main run or the --out of tools/convert_from_hf.py') from None
  if saved.lora.rank:  # its checkpoints hold adapters only
    raise ValueError(f'distill.teacher={d.teacher!r} is a LoRA run (lora.rank={saved.lora.rank}): '
                     'merge it into a whole model first (tools/convert_to_hf.py, then '
                     'tools/convert_from_hf.py) and pass that')
  cfg = dataclasses.replace(
      model_lib.ModelConfig.from_section(saved.model), param_dtype=d.teacher_dtype,
      dtype=d.teacher_dtype, remat='none', attention=student.attention,
      attention_max_segments=student.attention_max_segments, scan_layers=student.scan_layers,
      fp8=False, gather_in_compute_dtype=False)
  if cfg.vocab_size != student.vocab_size:
    raise ValueError(f'distill.teacher={d.teacher!r} has model.vocab_size={cfg.vocab_size} but the '
                     f'student has {student.vocab_size}: a teacher must share the tokenizer (set '
                     'model.vocab_size and data.tokenizer as the teacher run has them)')
  return cfg


def make_teacher(config: ml_collections.ConfigDict, student: model_lib.ModelConfig
                 ) -> tuple[Teacher, dict, dict] | None:
  """(Teacher, its parameters' logical specs, their abstract shapes), or None without one."""
  cfg = teacher_model(config, student)
  if cfg is None:
    return None
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
  d = config.distill
  teacher = Teacher(graphdef=graphdef, model_cfg=cfg, workdir=d.teacher, step=d.teacher_step,
                    alpha=d.alpha, temperature=d.temperature)
  return (teacher, nnx.to_pure_dict(nnx.get_partition_spec(abstract)),
          nnx.to_pure_dict(abstract))


def load_teacher(teacher: Teacher, abstract_params: dict) -> dict:
  """The teacher's parameters from its run, cast and laid out as `abstract_params` say."""
  run = rundir.RunDir(teacher.workdir)
  params, _ = run.restore_params(run.load_config(), abstract_params, teacher.step)
  return params


def check_teacher_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> None:
  """Refuses a teacher whose run tokenizes otherwise than the student's `tokenizer`: its logits
  would be over other ids."""
  if not config.distill.teacher:
    return
  run = rundir.RunDir(config.distill.teacher)
  theirs = run.tokenizer(run.load_config())
  if theirs.fingerprint() != tokenizer.fingerprint():
    raise ValueError(f'distill.teacher={config.distill.teacher!r} was trained with the tokenizer '
                     f'{theirs.path}, which differs from this run\'s {tokenizer.path}: set '
                     f'--config.data.tokenizer={theirs.path}')


def loss_sum(teacher: Teacher, teacher_params, student: model_lib.Llama, inputs_BL, targets_BL,
             weights_BL, *, loss_chunk: int, **kwargs):
  """The distillation objective summed over the weighted targets (loss.kd_sum), the head and
  loss fused over `loss_chunk` positions at a time when it is set (no [B, L, V] logits)."""
  model = nnx.merge(teacher.graphdef, teacher_params)
  teacher_x_BLD = jax.lax.stop_gradient(model.hidden(inputs_BL, **kwargs))
  kd = dict(alpha=teacher.alpha, temperature=teacher.temperature)
  if loss_chunk:
    return loss_lib.head_kd_sum(student.hidden(inputs_BL, **kwargs), student.head_DV(),
                                teacher_x_BLD, model.head_DV(), targets_BL, weights_BL,
                                loss_chunk, **kd)[0]
  return loss_lib.kd_sum(student(inputs_BL, **kwargs), model.logits(teacher_x_BLD), targets_BL,
                         weights_BL, **kd)[0]
