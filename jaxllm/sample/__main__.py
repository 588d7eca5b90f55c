"""`python -m jaxllm.sample`: continue prompts with a run's checkpoint and tokenizer.

    python -m jaxllm.sample --workdir=runs/tiny --prompt="ROMEO:" [--prompt="..."]
        [--max_new_tokens=100 --temperature=0.8 --top_k=0 --top_p=0.95 --seed=0 --step=-1]
        [--mesh=1,-1,1]

Several --prompt flags are decoded together as one batch. With a chat template (the run's
tokenizer's, or data.chat_template), `--chat=TEXT` (repeatable) is a user turn and
`--chat_file=F.jsonl` holds multi-turn conversations (`messages` rows, as training data): each is
rendered with the template's generation prompt and the assistant's reply printed, stopped at the
template's end of turn.

    python -m jaxllm.sample --workdir=runs/ft --chat="Who wrote Hamlet?" --temperature=0
"""

from absl import flags

from jaxllm import cli
from jaxllm import rundir
from jaxllm import sample as sample_lib
from jaxllm.sample import chat as chat_lib
from jaxllm import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'the --workdir of a jaxllm.main run', required=True)
_PROMPT = flags.DEFINE_multi_string('prompt', [''], 'text to continue; repeat for a batch')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'tokens generated per prompt at most',
                                       lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'softmax temperature; 0 = greedy',
                                   lower_bound=0)
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample from the k most likely tokens only; 0 = all',
                               lower_bound=0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'sample from the smallest set holding this probability',
                             lower_bound=0, upper_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'sampling seed')
_STEP = flags.DEFINE_integer('step', -1, 'checkpoint step; -1 = the latest')
_MESH = flags.DEFINE_string('mesh', '', rundir.MESH_FLAG_HELP)
_CHAT = flags.DEFINE_multi_string('chat', [], 'a user turn the assistant answers (chat template); '
                                  'repeat for a batch')
_CHAT_FILE = flags.DEFINE_string('chat_file', '', 'jsonl of conversations (`messages` rows) the '
                                 'assistant continues')


def main(argv):
  del argv
  run = rundir.RunDir(_WORKDIR.value)
  config, trainer, params, _ = run.reopen(train.setup, step=_STEP.value, mesh=_MESH.value)
  tokenizer = run.tokenizer(config)
  sampling = dict(mesh=trainer.mesh, rules=trainer.rules, max_new_tokens=_MAX_NEW_TOKENS.value,
                  temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                  seed=_SEED.value)
  if _CHAT.value or _CHAT_FILE.value:
    conversations = [[{'role': 'user', 'content': text}] for text in _CHAT.value]
    if _CHAT_FILE.value:
      conversations += chat_lib.read_conversations(_CHAT_FILE.value)
    for ids in chat_lib.replies(trainer.graphdef, params, tokenizer, conversations, **sampling):
      print(tokenizer.decode(ids), end='\n\n')
    return
  for text in sample_lib.sample_texts(trainer.graphdef, params, tokenizer, _PROMPT.value,
                                      **sampling):
    print(text, end='\n\n')


if __name__ == '__main__':
  cli.run(main)
