"""Human feedback collection: a local web page shows a prompt with K samples from a policy, a
person ranks them, and each ranking is appended to the K-wise preference file the `reward`
stage reads (experiments/stages/reward_data.py):

  {"prompt": str, "responses": [str, ...], "ranks": [int, ...], "labeller": "human", ...}

0 = best; equal ranks are ties (they form no pair in the K-wise loss). "All equal" writes all
ranks 0 with "tie": true, which the reward stage counts as a skip; skipped prompts go to
FILE.skipped.jsonl beside the file. Each line is appended in one write (O_APPEND, flock,
fsync) and nothing saved is ever rewritten; a restart shows only the prompts that neither
file holds yet. A malformed or incomplete ranking is refused with a message on the page and
nothing is written.

  python -m experiments.run --config=experiments/configs/label.py --workdir=runs/rlhf/label \
      --config.init_from=runs/rlhf/sft          # prints http://127.0.0.1:PORT/

Endpoints: GET / (the page), GET /api/item, POST /api/rank {"id", "ranks"}, POST /api/tie
{"id"}, POST /api/skip {"id"}, POST /api/shutdown. The server listens on 127.0.0.1 only. It
stops after max_items rankings, on /api/shutdown (exit 0), or on Ctrl-C / SIGTERM (exit 130 /
143, like a preempted training run: rerun the same command to continue).
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import os
import signal
import threading
import time
from importlib import resources
from typing import Callable, Sequence
from wsgiref import simple_server

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments.stages import policy, trainer

from lm import sharding
from lm.config import ConfigError

FILE = 'preferences.jsonl'
HOST = '127.0.0.1'             # never reachable from another machine
MAX_BODY = 1 << 20
LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'


class Rejected(ValueError):
  """A submission the page must refuse: the message is shown to the person as is."""


def skip_file(path: str) -> str:
  return os.path.splitext(path)[0] + '.skipped.jsonl'


def read_prompts(path: str) -> set[str]:
  """Prompts of the JSON lines of `path` (none if absent); unreadable lines are ignored here
  (the reward stage counts them)."""
  out = set()
  if not os.path.exists(path):
    return out
  with open(path, 'rb') as f:
    for raw in f:
      try:
        obj = json.loads(raw)
      except ValueError:
        continue
      if isinstance(obj, dict) and isinstance(obj.get('prompt'), str):
        out.add(obj['prompt'])
  return out


def append_line(path: str, record: dict) -> None:
  """One JSON line added to the end of `path` in a single write under an exclusive lock, then
  fsync'd. A torn last line (a crash mid-write) is closed with a newline first, so it stays
  one bad line the reader counts instead of swallowing this record."""
  line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
  fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    end = os.lseek(fd, 0, os.SEEK_END)
    if end and os.pread(fd, 1, end - 1) != b'\n':
      line = b'\n' + line
    view = memoryview(line)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  finally:
    os.close(fd)


def check_ranks(raw, n: int) -> list[int]:
  """The submitted ranks (0 = best, one per response, ties allowed) made dense (0, 1, ...:
  what rl/gold.ranks writes), or Rejected with what is wrong."""
  if not isinstance(raw, list):
    raise Rejected(f'A ranking is a list of {n} places, one per response; got {type(raw).__name__}.')
  if len(raw) != n:
    raise Rejected(f'This prompt has {n} responses but {len(raw)} places were sent; reload the page.')
  missing = [LETTERS[j] for j, r in enumerate(raw) if r is None]
  if missing:
    raise Rejected(f'Rank every response before submitting: {", ".join(missing)} '
                   f'{"has" if len(missing) == 1 else "have"} no place yet.')
  for j, r in enumerate(raw):
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n:
      raise Rejected(f'Response {LETTERS[j]} has place {r!r}; places are whole numbers from 1 '
                     f'to {n}.')
  uniq = sorted(set(raw))
  return [uniq.index(r) for r in raw]


@dataclasses.dataclass
class Item:
  id: int                     # the prompt's index in the (deduplicated) prompt list
  prompt: str
  responses: list[str]
  shown: float | None = None  # when the page first asked for it


class Labeller:
  """The queue of items, the files, and what the page may do; the web layer is make_app.

  A producer thread samples the next prompts while the person reads (at most `queue_size`
  items wait), so the page never waits for the model except at the very start.
  sample_fn(prompts, index) -> one list of responses per prompt."""

  def __init__(self, prompts: Sequence[str], sample_fn: Callable[[list[str], int], list[list[str]]],
               path: str, *, queue_size: int = 4, batch_prompts: int = 4, max_items: int = 0):
    self.path, self.skip_path = path, skip_file(path)
    self.sample_fn, self.queue_size = sample_fn, queue_size
    self.batch_prompts, self.max_items = batch_prompts, max_items
    prompts = list(dict.fromkeys(prompts))               # a repeated prompt is labelled once
    done = read_prompts(path) | read_prompts(self.skip_path)
    self.todo = [(i, p) for i, p in enumerate(prompts) if p not in done]
    self.counts = {'prompts': len(prompts), 'already_labelled': len(prompts) - len(self.todo),
                   'ranked': 0, 'tied': 0, 'skipped': 0, 'rejected': 0, 'too_few_responses': 0,
                   'empty_responses': 0, 'duplicate_responses': 0}
    self.pending: collections.deque[Item] = collections.deque()
    self.cond = threading.Condition()
    self.stopped = threading.Event()
    self.exhausted = False                               # the producer has no prompts left
    self.reason = ''                                     # why labelling stopped
    self.error = ''
    self._taken = 0                                      # items popped (labelled or skipped)
    self._thread: threading.Thread | None = None

  # -- the producer -------------------------------------------------------------------------
  def start(self) -> 'Labeller':
    self._thread = threading.Thread(target=self._produce, name='label-sampler', daemon=True)
    self._thread.start()
    return self

  def _produce(self) -> None:
    try:
      for lo in range(0, len(self.todo), self.batch_prompts):
        with self.cond:
          while len(self.pending) >= self.queue_size and not self.stopped.is_set():
            self.cond.wait(0.5)
          if self.stopped.is_set():
            return
        chunk = self.todo[lo:lo + self.batch_prompts]
        responses = self.sample_fn([p for _, p in chunk], lo)
        with self.cond:
          for (i, p), resp in zip(chunk, responses):
            kept, _ = policy.dedup_responses(list(resp), np.zeros(len(resp)), self.counts)
            if len(kept) < 2:
              self.counts['too_few_responses'] += 1
              continue
            self.pending.append(Item(i, p, kept))
          self.cond.notify_all()
    except Exception as e:                               # shown on the page, then stop
      self.error = f'Sampling failed: {type(e).__name__}: {e}'
      self.finish(self.error)
    finally:
      with self.cond:
        self.exhausted = True
        if not self.pending:
          self.finish('Every prompt is labelled.')
        self.cond.notify_all()

  def wait_ready(self, timeout: float = 60.0) -> bool:
    """Until an item waits or labelling stopped (for tests and scripts)."""
    with self.cond:
      return self.cond.wait_for(lambda: self.pending or self.stopped.is_set(), timeout)

  def finish(self, reason: str) -> None:
    with self.cond:
      if not self.stopped.is_set():
        self.reason = reason
        self.stopped.set()
      self.cond.notify_all()

  def close(self, timeout: float = 120.0) -> None:
    self.finish(self.reason or 'stopped')
    if self._thread is not None:
      self._thread.join(timeout)

  # -- what the page sees and does ----------------------------------------------------------
  def state(self) -> dict:
    with self.cond:
      item = self.pending[0] if self.pending and not self.stopped.is_set() else None
      if item is not None and item.shown is None:
        item.shown = time.time()
      if self.error:
        status = 'error'
      elif self.stopped.is_set():
        status = 'done'
      else:
        status = 'ready' if item else 'sampling'
      left = len(self.todo) - self._taken
      return {'status': status, 'message': self.error or self.reason,
              'item': item and {'id': item.id, 'prompt': item.prompt, 'responses': item.responses},
              'counts': dict(self.counts), 'remaining': left, 'path': self.path}

  def _current(self, body) -> Item:
    if not isinstance(body, dict) or 'id' not in body:
      raise Rejected('The request names no item ("id"); reload the page.')
    if self.stopped.is_set():
      raise Rejected(f'Labelling has stopped ({self.reason}); nothing was saved.')
    if not self.pending:
      raise Rejected('No prompt is waiting to be labelled yet; wait a moment and reload.')
    item = self.pending[0]
    if body['id'] != item.id:
      raise Rejected(f'That prompt (id {body["id"]!r}) is not the one being labelled now '
                     f'(id {item.id}); reload the page.')
    return item

  def _done_with(self, item: Item) -> None:
    self.pending.popleft()
    self._taken += 1
    labelled = self.counts['ranked'] + self.counts['tied']
    if self.max_items and labelled >= self.max_items:
      self.finish(f'Collected max_items={self.max_items} rankings.')
    elif self.exhausted and not self.pending:
      self.finish('Every prompt is labelled.')
    self.cond.notify_all()

  def _record(self, item: Item, ranks: list[int]) -> dict:
    now = time.time()
    rec = {'prompt': item.prompt, 'responses': item.responses, 'ranks': ranks,
           'labeller': 'human', 'time': round(now, 3),
           'seconds': round(now - item.shown, 1) if item.shown else None}
    if len(set(ranks)) == 1:
      rec['tie'] = True                                  # the reward stage counts it as a skip
    return rec

  def rank(self, body) -> dict:
    with self.cond:
      item = self._current(body)
      rec = self._record(item, check_ranks(body.get('ranks'), len(item.responses)))
      append_line(self.path, rec)
      self.counts['tied' if rec.get('tie') else 'ranked'] += 1
      self._done_with(item)
      return rec

  def tie(self, body) -> dict:
    with self.cond:
      item = self._current(body)
      rec = self._record(item, [0] * len(item.responses))
      append_line(self.path, rec)
      self.counts['tied'] += 1
      self._done_with(item)
      return rec

  def skip(self, body) -> dict:
    with self.cond:
      item = self._current(body)
      rec = {'prompt': item.prompt, 'skipped': True, 'time': round(time.time(), 3)}
      append_line(self.skip_path, rec)
      self.counts['skipped'] += 1
      self._done_with(item)
      return rec

  def shutdown(self, body) -> dict:
    del body
    self.finish('Stopped from the page (/api/shutdown).')
    return {}


ACTIONS = {'/api/rank': 'rank', '/api/tie': 'tie', '/api/skip': 'skip', '/api/shutdown': 'shutdown'}


def page() -> bytes:
  return resources.files('experiments').joinpath('label_page.html').read_bytes()


def make_app(lab: Labeller, html: bytes | None = None):
  """The WSGI application: the page, the item, and the POST actions (JSON in, JSON out; a
  refused action is HTTP 400 with {"error": message} beside the state)."""
  html = page() if html is None else html

  def reply(start_response, code: str, body: bytes, kind: str):
    start_response(code, [('Content-Type', kind), ('Content-Length', str(len(body))),
                          ('Cache-Control', 'no-store')])
    return [body]

  def as_json(start_response, code: str, obj: dict):
    return reply(start_response, code, json.dumps(obj).encode('utf-8'), 'application/json')

  def body_of(environ):
    try:
      n = int(environ.get('CONTENT_LENGTH') or 0)
    except ValueError:
      raise Rejected('Bad Content-Length.') from None
    if n > MAX_BODY:
      raise Rejected(f'Request body of {n} bytes is too large.')
    raw = environ['wsgi.input'].read(n) if n else b''
    try:
      return json.loads(raw or b'{}')
    except ValueError:
      raise Rejected('The request body is not JSON; reload the page.') from None

  def app(environ, start_response):
    method, path = environ['REQUEST_METHOD'], environ.get('PATH_INFO') or '/'
    if method == 'GET' and path in ('/', '/index.html'):
      return reply(start_response, '200 OK', html, 'text/html; charset=utf-8')
    if method == 'GET' and path == '/api/item':
      return as_json(start_response, '200 OK', lab.state())
    if method == 'POST' and path in ACTIONS:
      try:
        saved = getattr(lab, ACTIONS[path])(body_of(environ))
      except Rejected as e:
        with lab.cond:
          lab.counts['rejected'] += 1
        return as_json(start_response, '400 Bad Request', {**lab.state(), 'error': str(e)})
      return as_json(start_response, '200 OK', {**lab.state(), 'saved': saved})
    return as_json(start_response, '404 Not Found', {'error': f'No {method} {path} here.'})
  return app


class _QuietHandler(simple_server.WSGIRequestHandler):
  def log_message(self, *args):                          # one line per poll would drown the log
    pass


def serve(app, port: int) -> simple_server.WSGIServer:
  """A server on 127.0.0.1:port (0 = a free port), not yet serving."""
  try:
    return simple_server.make_server(HOST, port, app, handler_class=_QuietHandler)
  except OSError as e:
    raise ConfigError(f'Cannot listen on {HOST}:{port} ({e.strerror}); pick another port or '
                      '--config.port=0 for a free one.') from None


# -- the experiment ---------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  if config.rollout.samples < 2:
    raise ConfigError(f'rollout.samples={config.rollout.samples}: a ranking needs at least 2 responses '
                      'per prompt; set rollout.samples >= 2.')
  if config.rollout.samples > len(LETTERS):
    raise ConfigError(f'rollout.samples={config.rollout.samples}: the page shows at most {len(LETTERS)} '
                      'responses per prompt.')
  if not 0 <= config.port <= 65535:
    raise ConfigError(f'port={config.port} is not a TCP port; use 1-65535, or 0 for a free one.')
  if config.max_items < 0 or config.queue < 1:
    raise ConfigError('max_items must be >= 0 (0 = until every prompt is labelled) and queue >= 1.')
  if config.rollout.max_new_tokens < 1 or config.rollout.temperature <= 0:
    raise ConfigError('rollout.max_new_tokens must be >= 1 and rollout.temperature > 0 (samples, not greedy).')


def prompts_of(config: ConfigDict) -> list[str]:
  """config.prompts_file (one prompt a line, or JSON lines with "prompt") or the testbed's
  training prompts (experiments/policy.prompt_texts)."""
  path = config.prompts_file
  if not path:
    return policy.prompt_texts(config, 'train')
  if not os.path.isfile(path):
    raise ConfigError(f'prompts_file={path!r} does not exist.')
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith('.jsonl'):
        try:
          obj = json.loads(line)
        except ValueError:
          raise ConfigError(f'{path}:{n} is not JSON; a .jsonl prompts file holds {{"prompt": ...}} '
                            'lines.') from None
        if not isinstance(obj, dict) or not isinstance(obj.get('prompt'), str):
          raise ConfigError(f'{path}:{n} has no string "prompt" field.')
        out.append(obj['prompt'])
      else:
        out.append(line.rstrip('\n'))
  if not out:
    raise ConfigError(f'prompts_file={path!r} holds no prompts.')
  return out


def policy_sampler(pol: policy.Policy, params, tokens_of: dict, config: ConfigDict, mesh):
  """sample_fn for Labeller: K samples of each prompt from the policy, one row per sample."""
  s = policy.sampling_config(pol, config.rollout.max_new_tokens, config.rollout.temperature)
  key, k = jax.random.key(config.seed), config.rollout.samples

  def sample_fn(prompts: list[str], index: int) -> list[list[str]]:
    reps = [tokens_of[p] for p in prompts for _ in range(k)]
    texts = []
    for gen in policy.sample(params, pol, reps, jax.random.fold_in(key, index), s, mesh,
                             config.rollout.batch_size):
      texts += policy.texts_of(pol, gen)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
  return sample_fn


def run(config: ConfigDict, workdir: str) -> dict:
  check(config)
  os.makedirs(workdir, exist_ok=True)
  pol = policy.open_policy(config.init_from)
  texts = prompts_of(config)
  ids = policy.encode_prompts(pol, texts, pol.cfg.max_seq_len - config.rollout.max_new_tokens)
  out = os.path.abspath(config.out or os.path.join(workdir, FILE))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  server = serve(None, config.port)                      # a busy port fails before the model loads
  try:
    trainer.write_config(config, workdir, {'source': pol.source.record(), 'out': out})
    mesh = sharding.make_mesh(config.mesh.to_dict())
    params = pol.source.restore_params(mesh, pol.cfg)
    lab = Labeller(texts, policy_sampler(pol, params, dict(zip(texts, ids)), config, mesh), out,
                   queue_size=config.queue, batch_prompts=max(1, config.rollout.batch_size // config.rollout.samples),
                   max_items=config.max_items)
  except BaseException:
    server.server_close()
    raise
  server.set_app(make_app(lab))
  url = f'http://{HOST}:{server.server_port}/'
  with open(os.path.join(workdir, 'server.json'), 'w') as f:
    json.dump({'url': url, 'pid': os.getpid(), 'out': out}, f)
  print(f'Labelling page: {url}  ({len(lab.todo):,} of {lab.counts["prompts"]:,} prompts left; '
        f'rankings append to {out}; Ctrl-C stops, nothing is lost)', flush=True)

  signum = []
  old = {}
  if threading.current_thread() is threading.main_thread():
    def on_signal(n, frame):
      signum.append(n)
      lab.finish(f'Stopped by {signal.Signals(n).name}.')
    for s in (signal.SIGTERM, signal.SIGINT):
      old[s] = signal.signal(s, on_signal)
  serving = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.2},
                             name='label-server', daemon=True)
  serving.start()
  lab.start()
  t0 = time.time()
  try:
    while not lab.stopped.wait(0.5):
      pass
  finally:
    server.shutdown()
    server.server_close()
    lab.close()
    for s, h in old.items():
      signal.signal(s, h)
  report = {'counts': lab.counts, 'reason': lab.reason, 'out': out, 'url': url,
            'seconds': round(time.time() - t0, 1)}
  with open(os.path.join(workdir, 'label_report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  c = lab.counts
  print(f'{lab.reason} {c["ranked"]} ranked, {c["tied"]} tied, {c["skipped"]} skipped, '
        f'{c["rejected"]} refused submissions this session; {out} holds every ranking so far.')
  if signum:
    raise trainer.Preempted(c['ranked'] + c['tied'], signum[0])
  if lab.error:
    raise trainer.TrainingError(lab.error)
  return report
