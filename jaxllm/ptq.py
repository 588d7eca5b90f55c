"""Post-training weight quantization: a model transform that stores every matrix of a trained
Llama quantized (jaxllm/quant.py's int8 per output channel or int4 per group) and dequantizes it
per layer, inside the layer scan, where it is used (model._weight). Norms and biases stay float.

`quantize_model` replaces the parameters of a built model in place with `quant.QuantizedWeight`
modules, so `nnx.split` gives the quantized graphdef and state: `trainer.make_trainer` does so
for a config with `ptq.format` set, which makes evaluation (`jaxllm.evaluate`) and sampling
(`jaxllm.sample`) of a quantized run the same code as of a float one. `jaxllm/compress.py`
writes such runs (`quantize_run`).

Qwix was the library considered first; it does not fit jaxllm's model (see jaxllm/quant.py):
it recognises weights at the matmuls it intercepts, but jaxllm's weights reach `jnp.matmul`
cast and reshaped inside `nnx.scan`.
"""

from __future__ import annotations

from flax import nnx

from jaxllm import model as model_lib
from jaxllm import quant

# (module path inside the model, parameter, input dims contracted by its matmul).
_LAYER_MATRICES = (('self_attn', 'q_proj', 1), ('self_attn', 'k_proj', 1),
                   ('self_attn', 'v_proj', 1), ('self_attn', 'o_proj', 2),
                   ('mlp', 'gate_proj', 1), ('mlp', 'up_proj', 1), ('mlp', 'down_proj', 1))


def quantize_model(model: model_lib.Llama, *, fmt: str, group_size: int = 64) -> None:
  """Every matrix of `model` (the layers' projections, the embedding and an untied head) stored
  as `fmt` ('int8' or 'int4' with groups of `group_size` input rows), in place. Raises ValueError
  naming ptq.group_size when 4-bit groups do not tile a matrix's input width."""
  targets = [(getattr(model.layers, part), name, n_in, 1) for part, name, n_in in _LAYER_MATRICES]
  targets.append((model, 'embed_tokens', 1, 0))  # [V, D] rows as inputs: groups of tokens
  if not model.cfg.tie_embeddings:
    targets.append((model, 'lm_head', 1, 0))
  for owner, name, n_in, n_lead in targets:
    param = getattr(owner, name)
    names = param.get_metadata()['out_sharding']
    try:
      setattr(owner, name, quant.QuantizedWeight(param[...], n_lead=n_lead, n_in=n_in,
                                                  names=names, fmt=fmt, group_size=group_size))
    except ValueError as e:
      raise ValueError(f'ptq.group_size={group_size} cannot quantize {name} {param.shape}: {e}')


def quantize_params(graphdef: nnx.GraphDef, params: dict, *, fmt: str,
                    group_size: int = 64) -> dict:
  """The pure-dict parameters of `quantize_model` applied to the float model (graphdef, params);
  jit it with the quantized trainer's shardings to quantize on the devices."""
  model = nnx.merge(graphdef, params)
  quantize_model(model, fmt=fmt, group_size=group_size)
  return nnx.to_pure_dict(nnx.state(model))
