"""Documents of text sources, random access: file sources built once into a TFDS array_record
dataset, or a prepared TFDS dataset; the eval split, its overlap check, and the fingerprint a
checkpoint's data position is checked against. Which files a source names and how a file is cut
into documents is `jaxllm/sources.py`.

- Datasets: a file source is built under `<cache_dir>/<key>/`, the key hashing the files' paths,
  sizes and mtimes plus the document rules, so a changed source builds afresh and an unchanged one
  is reused.
- Eval split: `eval_files` whole files of the first source, taken at a fixed stride from the sorted
  file names (42 files, eval_files=2 -> the 11th and 32nd), recorded in `Sources.eval_file_names`;
  or, with `eval_source`, all of another SPEC (required when the first source is a TFDS dataset),
  which must share no file and no document (by hash, `doc_hash`) with a train source; or, with
  `eval_fraction` (for a source of one file, such as a chats.jsonl), the documents of the first
  source whose hash falls in that fraction, wherever they are (a duplicate lands beside its
  twin, so the split never leaks a document). An empty
  eval split is an error, not a loss of 0.
- Fingerprint: `Sources.fingerprint()`, a hash of each source's documents in order (the same on
  every host holding the same text, wherever its files live), is saved with checkpoints; a resume
  compares it, since a changed source changes the order a saved data position replays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from jaxllm.sources import DOC_CHARS, BadRecords, Conversation, file_documents, list_source_files

OVERLAP_MIN_CHARS = 100  # shorter documents ('[Exit.]' ends 3 plays) repeat in unrelated texts
_FORMAT = 5  # bump when the document rules change, so caches rebuild (5: conversations)


def pick_eval_files(names: list[str], eval_files: int) -> list[str]:
  """`eval_files` names at a fixed stride through the sorted list, centred in each stride."""
  n = len(names)
  if not 0 < eval_files < n:
    raise ValueError(f'eval_files={eval_files}: must be between 1 and {n - 1} for {n} source files '
                     '(or set eval_source)')
  names = sorted(names)
  return [names[(2 * i + 1) * n // (2 * eval_files)] for i in range(eval_files)]


class JaxllmTextDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of source files; split 'eval' holds out whole files (only when there are any)."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, files: list[Path], eval_names: list[str], text_field: str = 'text',
               skip_bad_records: bool = False, eval_fraction: float = 0.0, **kwargs: Any):
    self._files, self._eval_names, self._field = files, eval_names, text_field
    self._fraction = eval_fraction
    self.bad = BadRecords(skip_bad_records)
    self.hashes: dict[str, list[int]] = {}  # split -> doc_hash of its long documents, as built
    self.content: dict[str, Any] = {}  # split -> sha256 of its documents in order
    self.docs: dict[str, int] = {}  # split -> documents
    self.chats: dict[str, int] = {}  # split -> documents that are conversations
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self) and not dataset_info_from_configs(): the latter needs a package dir.
    return tfds.core.DatasetInfo(
        builder=self, description=f'eval files: {", ".join(self._eval_names)}',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'file': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: eval reads deterministically, train is shuffled by grain

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    if self._fraction:
      return {split: self._generate_examples(self._files, split) for split in ('train', 'eval')}
    ev = set(self._eval_names)
    splits = {'train': self._generate_examples([f for f in self._files if str(f) not in ev], 'train')}
    if ev:
      splits['eval'] = self._generate_examples([f for f in self._files if str(f) in ev], 'eval')
    return splits

  def _generate_examples(self, files: list[Path], split: str) -> Iterator[tuple[str, dict[str, str]]]:
    hashes, self.docs[split], self.chats[split] = self.hashes.setdefault(split, []), 0, 0
    content = self.content.setdefault(split, hashlib.sha256())
    for f in files:
      for i, doc in enumerate(file_documents(f, text_field=self._field, bad=self.bad)):
        if self._fraction and held_out(doc, self._fraction) != (split == 'eval'):
          continue
        self.docs[split] += 1
        self.chats[split] += isinstance(doc, Conversation)
        if self.chats[split] not in (0, self.docs[split]):
          raise ValueError(f'{f}: document {i} is {"a" if isinstance(doc, Conversation) else "not a"} '
                           'conversation, unlike the ones before it: keep text and conversations '
                           'in separate sources')
        content.update(doc.encode('utf-8') + b'\0')
        if len(doc) >= OVERLAP_MIN_CHARS:
          hashes.append(doc_hash(doc))
        yield f'{f}:{i:09d}', {'text': doc, 'file': f.name}


def doc_hash(text: str) -> int:
  """64 bits of a document's BLAKE2 hash: finds the same document in two sources."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


def held_out(text: str, fraction: float) -> bool:
  """Whether a document is in the eval split of `eval_fraction=fraction` (by its doc_hash)."""
  return doc_hash(text) % 1_000_000 < fraction * 1_000_000


@dataclasses.dataclass
class Documents:
  """Random-access documents of one source; `key` changes whenever their content may have, and so
  does `fingerprint` (which, unlike `key`, does not move with the cache directory)."""

  name: str
  key: str
  data: Any  # a tfds data source: data[i][field] is the UTF-8 text
  field: str = 'text'
  fingerprint: str = ''
  files: tuple[Path, ...] = ()  # the source files (none for a TFDS dataset)
  hashes_path: str = ''  # sorted unique doc_hash of every document ('': not known, TFDS)
  chat: bool = False  # the documents are conversations (sources.Conversation: JSON of messages)

  def hashes(self) -> np.ndarray:
    return np.load(self.hashes_path) if self.hashes_path else np.zeros(0, np.uint64)

  def __len__(self) -> int:
    return len(self.data)

  def text(self, i: int) -> str:
    t = self.data[int(i)][self.field]
    return t.decode('utf-8') if isinstance(t, bytes) else t


@dataclasses.dataclass
class Sources:
  """What open_sources() found: train sources with weights, the eval documents, bad-record counts."""

  train: list[Documents]
  weights: list[float]
  eval: Documents
  eval_file_names: list[str]
  data_dir: str  # the first source's dataset directory
  skipped: dict[str, int]

  def fingerprint(self) -> dict[str, dict[str, str]]:
    """{'train': {source: fingerprint}, 'eval': {...}}: what a saved data position assumes."""
    return {'train': {d.name: f'{d.fingerprint} {len(d)}' for d in self.train},
            'eval': {self.eval.name: f'{self.eval.fingerprint} {len(self.eval)}'}}


def _open_files(spec: str, *, cache_dir: str, eval_files: int, text_field: str,
                skip_bad_records: bool, eval_fraction: float = 0.0,
                ) -> tuple[Any, list[Path], list[str], dict[str, int], str]:
  """Builds (or reuses) the array_record dataset of a file source; returns (builder, files, eval
  paths, skipped, fingerprint: the hash of the files, their sizes and mtimes and the rules)."""
  listing = BadRecords(skip_bad_records)
  files = list_source_files(spec, listing, exclude=[cache_dir])
  eval_paths = (pick_eval_files([str(f) for f in files], eval_files)
                if eval_files and not eval_fraction else [])
  key = hashlib.sha256(f'{_FORMAT} {DOC_CHARS} {text_field} {skip_bad_records} {eval_paths} '
                       f'{eval_fraction}'.encode())
  for f in files:
    st = f.stat()
    key.update(f'{f} {st.st_size} {st.st_mtime_ns}\n'.encode())
  fingerprint = key.hexdigest()[:16]
  builder = JaxllmTextDocuments(files=files, eval_names=eval_paths, text_field=text_field,
                                skip_bad_records=skip_bad_records, eval_fraction=eval_fraction,
                                file_format='array_record',
                                data_dir=str(Path(cache_dir) / fingerprint))
  skipped_file = Path(builder.data_dir) / 'skipped.json'
  if not builder.is_prepared():
    tfds.display_progress_bar(False)  # a one-second build need not flood the training log
    try:
      builder.download_and_prepare()
    except AssertionError:  # TFDS's way to say that a split yielded no examples
      if builder.docs.get('eval') == 0 and eval_fraction:
        raise EmptySource(f'data.eval_fraction={eval_fraction} holds out no document of {spec}: '
                          'raise it, or set data.eval_source') from None
      if builder.docs.get('eval') == 0:
        names = ', '.join(Path(p).name for p in eval_paths)
        raise EmptySource(f'the data.eval_files={eval_files} files held out of {spec} ({names}) '
                          f'hold {_NO_DOCS}, so eval would report loss 0; raise data.eval_files or set '
                          'data.eval_source') from None
      if builder.docs.get('train') == 0:
        raise EmptySource(f'{spec}: {_NO_DOCS} in it; point it at text') from None
      raise
    for split, hashes in builder.hashes.items():
      np.save(Path(builder.data_dir) / f'doc_hashes.{split}.npy', np.unique(np.array(hashes, np.uint64)))
    for split, content in builder.content.items():
      (Path(builder.data_dir) / f'content.{split}.txt').write_text(content.hexdigest()[:16])
    (Path(builder.data_dir) / 'chat.json').write_text(json.dumps(builder.chats))
    skipped_file.write_text(json.dumps(builder.bad.counts))
  built = json.loads(skipped_file.read_text()) if skipped_file.exists() else {}
  skipped = {**listing.counts, **built}
  if skipped:
    logging.warning('%s: skipped %d bad files or records (skip_bad_records=True): %s', spec,
                    sum(skipped.values()), skipped)
  return builder, files, eval_paths, skipped, fingerprint


class EmptySource(ValueError):
  """A file source, or the files it holds out for eval, without a document."""


_NO_DOCS = 'no documents (empty, whitespace only or skipped as bad)'


def _open_tfds(spec: str, *, tfds_data_dir: str | None, text_field: str) -> Documents:
  """`tfds:NAME:SPLIT`, already prepared as array_record; nothing is downloaded."""
  name, _, split = spec.removeprefix('tfds:').rpartition(':')
  if not name or not split:
    raise ValueError(f'{spec}: write tfds:NAME:SPLIT, for example tfds:lm1b:train or tfds:c4/en:3.0.1:train')
  where = tfds_data_dir or 'the default TFDS data_dir'
  try:
    builder = tfds.builder(name, data_dir=tfds_data_dir)
  except Exception as e:  # tfds raises several types for an unknown or unprepared name
    raise FileNotFoundError(f'{spec}: no dataset {name!r} in {where} ({type(e).__name__}); prepare it '
                            'there with `tfds build --file_format=array_record` or set tfds_data_dir') from None
  if not builder.is_prepared():
    raise FileNotFoundError(f'{spec}: not prepared in {builder.data_dir}; run `tfds build {name} '
                            '--file_format=array_record` there or set tfds_data_dir')
  if split not in builder.info.splits:
    raise ValueError(f'{spec}: no split {split!r} (has: {", ".join(builder.info.splits)})')
  if text_field not in builder.info.features:
    raise ValueError(f'{spec}: no feature {text_field!r} (has: {", ".join(builder.info.features)}); '
                     'set text_field')
  try:
    data = builder.as_data_source(split)
  except Exception as e:
    raise ValueError(f'{spec}: cannot be read without TensorFlow ({str(e).splitlines()[0]}); rebuild '
                     'it with --file_format=array_record') from None
  return Documents(spec, f'tfds {builder.data_dir} {split} {text_field}', data, text_field,
                   f'tfds {name} {builder.version} {split} {text_field}')


def _open_one(spec: str, *, hold_out: int, cache_dir: str, text_field: str, tfds_data_dir: str | None,
              skip_bad_records: bool, fraction: float = 0.0,
              ) -> tuple[Documents, Documents | None, list[str], dict[str, int]]:
  """(train documents, held-out eval documents or None, eval file names, skipped) of one SPEC:
  `hold_out` whole files, or the `fraction` of its documents (module doc)."""
  if spec.startswith('tfds:'):
    return _open_tfds(spec, tfds_data_dir=tfds_data_dir, text_field=text_field), None, [], {}
  builder, files, eval_paths, skipped, fingerprint = _open_files(
      spec, cache_dir=cache_dir, eval_files=hold_out, text_field=text_field,
      skip_bad_records=skip_bad_records, eval_fraction=fraction)
  # A read-only builder: its data sources pickle into grain's worker processes (ours need our args).
  builder = tfds.builder_from_directory(builder.data_dir)
  # What a checkpoint's data position assumes is the documents themselves: their content hash, the
  # same on every host holding the same text wherever its files live and whatever their mtimes.
  content = lambda split: (Path(builder.data_dir) / f'content.{split}.txt').read_text()
  chats = json.loads((Path(builder.data_dir) / 'chat.json').read_text())
  train = Documents(spec, str(builder.data_dir), builder.as_data_source('train'),
                    fingerprint=content('train'),
                    files=tuple(f for f in files if str(f) not in eval_paths),
                    hashes_path=str(Path(builder.data_dir) / 'doc_hashes.train.npy'),
                    chat=chats.get('train', 0) > 0)
  if not (eval_paths or fraction):
    return train, None, [], skipped
  held = Documents(f'{spec} (held out)', f'{builder.data_dir} eval', builder.as_data_source('eval'),
                   fingerprint=content('eval'),
                   files=tuple(Path(p) for p in eval_paths) if eval_paths else tuple(files),
                   hashes_path=str(Path(builder.data_dir) / 'doc_hashes.eval.npy'),
                   chat=chats.get('eval', 0) > 0)
  return train, held, [Path(p).name for p in eval_paths], skipped


def check_no_overlap(eval_docs: Documents, train: Sequence[Documents]) -> None:
  """An eval_source must not share files or documents (by doc_hash) with a train source: its loss
  would then measure memorisation. TFDS sources are compared by name and split only."""
  fix = ('evaluate on text the run does not train on, or leave data.eval_source empty to hold out '
         'data.eval_files')
  eval_files = {f.resolve(): f for f in eval_docs.files}
  eval_hashes = eval_docs.hashes()
  for docs in train:
    if docs.fingerprint == eval_docs.fingerprint:
      raise ValueError(f'data.eval_source={eval_docs.name} is the train source {docs.name}; {fix}')
    shared = sorted(eval_files[r] for r in eval_files.keys() & {f.resolve() for f in docs.files})
    if shared:
      raise ValueError(f'data.eval_source={eval_docs.name} and the train source {docs.name} share '
                       f'{len(shared)} files (first: {shared[0]}); {fix}')
    same = int(np.isin(eval_hashes, docs.hashes()).sum()) if len(eval_hashes) else 0
    if same:
      raise ValueError(f'data.eval_source={eval_docs.name}: {same} of its {len(eval_hashes)} distinct '
                       f'documents (of {OVERLAP_MIN_CHARS}+ characters) are also in the train source '
                       f'{docs.name}; {fix}')


def open_sources(sources: Sequence[tuple[str, float]], *, cache_dir: str, eval_files: int,
                 eval_source: str = '', text_field: str = 'text', tfds_data_dir: str | None = None,
                 skip_bad_records: bool = False, eval_fraction: float = 0.0) -> Sources:
  """Opens every source (building file sources under cache_dir) and picks the eval documents."""
  opts = dict(cache_dir=cache_dir, text_field=text_field, tfds_data_dir=tfds_data_dir,
              skip_bad_records=skip_bad_records)
  opened = [_open_one(spec, hold_out=0 if n or eval_source else eval_files,
                      fraction=0.0 if n or eval_source else eval_fraction, **opts)
            for n, (spec, _) in enumerate(sources)]
  eval_docs, eval_names = opened[0][1], opened[0][2]
  skipped = {k: v for o in opened for k, v in o[3].items()}
  if eval_source:
    try:
      eval_docs, _, _, bad = _open_one(eval_source, hold_out=0, **opts)
      if not len(eval_docs):  # a TFDS split (an empty file source is caught as it is built)
        raise EmptySource(eval_source)
    except EmptySource:
      raise ValueError(f'data.eval_source={eval_source} holds {_NO_DOCS}, so eval would report loss 0; '
                       'point it at held-out text') from None
    skipped.update(bad)
    check_no_overlap(eval_docs, [o[0] for o in opened])
  if eval_docs is None:
    raise ValueError(f'{sources[0][0]}: a TFDS source holds no files to keep out for eval; set data.eval_source '
                     '(for example tfds:lm1b:test)')
  for docs, *_ in opened:
    if not len(docs):
      raise ValueError(f'{docs.name}: no train documents in it (all held out for eval, empty or skipped)')
  return Sources([o[0] for o in opened], [w for _, w in sources], eval_docs, eval_names,
                 opened[0][0].key, skipped)
