"""How every command-line program ends: an error jaxllm raises on purpose (a bad flag, config key,
file or checkpoint) is one line on stderr and exit status 1; `--verbose` shows its traceback.

    if __name__ == '__main__':
      cli.run(main)  # instead of absl's app.run(main)

The rule: `USER_ERRORS` are the exception types whose message is written for the user, who can
act on it without the code. Every other exception is a bug and keeps its traceback. A flag absl
cannot parse (a misspelt flag, `--config.train.num_steps=abc`) is one such line too.
"""

import sys

from absl import app, flags

from jaxllm import checkpoint as checkpoint_lib

# ValueError covers config validation, convert.UnsupportedError, sources.EmptySource and parse
# errors jaxllm rewords; OSError the missing, existing or unreadable paths (their messages name
# the path); FloatingPointError a loss or parameters that are not finite.
USER_ERRORS = (ValueError, OSError, FloatingPointError, checkpoint_lib.CheckpointError)


def one_line(e: BaseException | str) -> str:
  """'error: MESSAGE' on one line, whatever newlines the message held."""
  text = ' '.join(str(e).split()) or type(e).__name__
  return f'error: {text}'


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # absl's own parser would add a second line on --helpshort
    print(f'{one_line(e)} (--helpshort lists the flags)', file=sys.stderr, flush=True)
  except (AttributeError, KeyError) as e:
    # ml_collections on a --config.X key the config lacks: AttributeError(KeyError(message)),
    # the message "'KEY'" and a line suggesting the nearest key.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    key, *hint = str(e.args[0] if e.args else e).splitlines()
    print(one_line(f"--config: {key} is not a config key (jaxllm/config.py declares every one); "
                   f"{' '.join(hint)}"), file=sys.stderr, flush=True)
  sys.exit(1)


def run(main) -> None:
  """absl's app.run(main), with USER_ERRORS and flag errors as one stderr line (unless
  --verbose for the former)."""
  flags.DEFINE_bool('verbose', False, 'show the traceback of an error in a bad input')

  def quiet(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.verbose:
        raise
      print(one_line(e), file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(quiet, flags_parser=_parse_flags)
