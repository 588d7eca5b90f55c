"""The assistant's next turn of conversations: the prompt rendered by the tokenizer's chat
template with its generation prompt (jaxllm.chat), decoding stopped at the template's end of turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from jaxllm import chat
from jaxllm import sample


def replies(graphdef, params, tokenizer, conversations: Sequence[Sequence[dict]], **kwargs
            ) -> list[list[int]]:
  """The ids of the next assistant turn of each conversation (a list of {role, content}), end
  of turn excluded; `kwargs` as `sample.generate_ids` takes them (mesh, rules, sampling)."""
  prompts = [chat.prompt_ids(tokenizer, messages).tolist() for messages in conversations]
  return sample.generate_ids(graphdef, params, prompts, stop_ids=chat.end_of_turn_ids(tokenizer),
                             **kwargs)


def read_conversations(path: str) -> list[list[dict]]:
  """The conversations of a jsonl file (rows as data sources take them: `messages`, or `prompt`
  and `completion`), each to be continued by the assistant."""
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        where = f'{path}:{n}'
        try:
          row = json.loads(line)
        except ValueError:
          raise ValueError(f'{where}: not a JSON object; fix or delete the line') from None
        out.append(chat.conversation(row, where))
  if not out:
    raise ValueError(f'--chat_file={path} holds no conversation')
  return out
