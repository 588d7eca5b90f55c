"""Checkpoint conversion to and from Hugging Face transformers.

    hf.py              the key table (jaxllm parameter <-> HF tensor) and the config mapping
    hf_tokenizer.py    sentencepiece model -> tokenizer.json / tokenizer_config.json
    safetensors_io.py  safetensors reading, streaming writing, shard planning
    export.py          a jaxllm run (or params in memory) -> an HF model folder
    import_.py         an HF model folder -> a jaxllm run directory to fine-tune from

The first three are leaves (no file layout of a run, no torch); the last two compose them with
the run directory and the checkpointer, and `tools/convert_*_hf.py` are their CLIs.
"""


class UnsupportedError(ValueError):
  """An HF model, option or file that jaxllm cannot convert faithfully; the message names it."""
