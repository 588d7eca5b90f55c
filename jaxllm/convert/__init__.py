"""Checkpoint conversion to and from Hugging Face transformers.

    hf.py              the key table (jaxllm parameter <-> HF tensor) and the config mapping
    hf_tokenizer.py    sentencepiece model -> tokenizer.json / tokenizer_config.json; the files of
                       an HF tokenizer folder, its BOS/EOS ids, its chat template
    safetensors_io.py  safetensors reading (by offsets, no memory map), streaming writing, shards
    export.py          a jaxllm run (or params in memory) -> an HF model folder
    import_.py         an HF model folder -> a jaxllm run directory to fine-tune from

The first three are leaves (no file layout of a run, no torch); the last two compose them with
the run directory and the checkpointer, and `tools/convert_*_hf.py` are their CLIs.
"""

import os

# The converters write every file whole (jaxllm/files.py), through the package's own name.
from jaxllm.files import is_url, replacing  # noqa: F401


class UnsupportedError(ValueError):
  """An HF model, option or file that jaxllm cannot convert faithfully; the message names it."""


def check_out(out: str, *, source: str, overwrite: bool) -> None:
  """Refuses an --out that is the source folder (it would be overwritten), and one that already
  holds files unless `overwrite` (a re-conversion would mix old and new files), and a URL."""
  if is_url(out):  # os calls would write it under ./gs:/ (jaxllm.files)
    raise ValueError(f'--out={out}: the converters write a local folder; convert into a local '
                     '--out, then copy that folder to the bucket')
  if os.path.realpath(out) == os.path.realpath(source):
    raise ValueError(f'--out={out} is the folder being converted: choose another one')
  if os.path.islink(out) and not os.path.exists(out):
    raise FileNotFoundError(f'--out={out} links to {os.readlink(out)}, which does not exist: '
                            'create that folder, or choose another --out')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f'--out={out} is not empty: choose a new folder, or pass --overwrite to '
                          'replace the files this conversion writes there')
