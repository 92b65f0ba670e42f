"""The `serve` experiment: a run workdir or `hf:` folder behind an OpenAI-compatible HTTP API on
127.0.0.1, generating with the continuous-batching engine (lm/engine.py).

  python -m experiments.run --config=experiments/configs/serve.py --workdir=runs/serve \\
      --config.init_from=runs/works_char [--config.port=8000]

Routes: POST /v1/completions, POST /v1/chat/completions (stream=true: server-sent events),
GET /v1/models, GET /health. Sampling parameters: max_tokens, temperature, top_p, n, stop, seed,
logprobs (completions: 0-5 alternatives; chat: logprobs + top_logprobs 0-5); the log-probs
are the model's own (log_softmax of its logits). Without a seed each choice draws a random
one; with a seed, choice i of a request uses seed + i (reproducible, whatever else is served).

Chat prompts are rendered with the run's template (config.data.template of an SFT run: chat
markers, or Alpaca / none for one user turn), else the tokenizer's chat_template (a Hugging
Face folder's), else a plain transcript ("user: ...\\nassistant:"). Generation ends at the
tokenizer's EOS (and the chat end marker), a stop string, or max_tokens.

One engine thread runs every request; HTTP threads only parse, submit and write. A bad request
gets {"error": {"message": one sentence, "type", "param"}} with a 4xx status and the server
goes on; a client that disconnects mid-stream has its requests cancelled. SIGTERM / SIGINT stop
accepting connections, let the requests in flight finish (up to config.drain_seconds), and
exit with 128 + the signal number, like every other stage.

`config.mode = 'bench'` instead measures the engine beside static batching (decode.generate
in fixed batches) on a mixed-length workload at equal KV-cache memory: bench.json.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
import traceback
import uuid
from http import server as http_server

import jax
import numpy as np
from ml_collections import ConfigDict

from data import formats, tokenizers
# Opening a run (read_source) and Preempted: the one place to repoint if stages/ moves.
from experiments.stages import stage, trainer
from lm import engine as engine_lib
from lm import sharding
from lm.config import ConfigError

HOST = '127.0.0.1'
MAX_BODY = 1 << 20          # bytes of JSON a request may carry
MAX_N = 16                  # choices per prompt
MAX_STOP = 8                # stop strings per request


class BadRequest(Exception):
  """A request the server refuses: HTTP status and one sentence for the client."""

  def __init__(self, message: str, status: int = 400, param: str | None = None,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.param, self.kind = status, param, kind

  def body(self) -> dict:
    return {'error': {'message': str(self), 'type': self.kind, 'param': self.param,
                      'code': None}}


# The model ----------------------------------------------------------------------------------
class Model:
  """A served model: params, config, tokenizer, the ids that end a response and how chats
  become prompt tokens."""

  def __init__(self, init_from: str, name: str = ''):
    if not init_from:
      raise ConfigError('serve needs --config.init_from=DIR (a run workdir) or hf:PATH.')
    source = stage.read_source(init_from)
    self.cfg, self.tok = source.cfg, source.tokenizer
    if self.cfg.arch != 'decoder' or not self.cfg.causal:
      raise ConfigError(f'serve generates with causal decoder-only models; {init_from} holds a '
                        f'{self.cfg.arch} model.')
    # One device: the engine's pool lives there (a mesh would split the batch of a few rows).
    mesh = sharding.make_mesh({'data': 1}, devices=jax.devices()[:1])
    self.params = source.restore_params(mesh, self.cfg)
    self.name = name or os.path.basename(os.path.normpath(init_from.removeprefix('hf:')))
    self.template = None
    if source.kind == 'run' and source.config is not None and 'template' in source.config.get('data', {}):
      self.template = source.config.data.template
    ids = self.tok.special_ids
    self.eos_ids = tuple(sorted({ids[n] for n in ('eos', 'end') if ids.get(n) is not None}))
    self.unsampleable = ~tokenizers.sampling_mask(self.tok, self.cfg.padded_vocab)

  def encode(self, text: str) -> list[int]:
    try:
      return [int(i) for i in self.tok.encode(text)]
    except tokenizers.TokenizerError as e:
      raise BadRequest(f'The text cannot be encoded by this model\'s tokenizer: {e}') from None

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids])

  def token_text(self, i: int) -> str:
    return self.decode([i])

  def chat_prompt(self, messages: list) -> list[int]:
    """Prompt tokens for a chat: the run's template, the tokenizer's chat_template (a Hugging
    Face folder's, rendered by data/formats), or a plain transcript."""
    template = self.template or ('chat' if getattr(self.tok, 'chat_template', None) else None)
    if template is None:
      return self.encode(''.join(f"{m['role']}: {m['content']}\n" for m in messages) + 'assistant:')
    try:
      ex = ({'messages': messages} if formats.get_template(template).is_chat else
            {'instruction': _single_user_turn(messages, template), 'input': ''})
      return [int(i) for i in formats.prompt_tokens(ex, template, self.tok)]
    except (formats.FormatError, tokenizers.TokenizerError) as e:
      raise BadRequest(str(e), param='messages') from None


def _single_user_turn(messages: list, template: str) -> str:
  users = [m for m in messages if m['role'] == 'user']
  if len(users) != 1 or messages[-1]['role'] != 'user':
    raise BadRequest(f'This model was tuned with the {template!r} template, which takes one user '
                     'message (optionally after a system message); send a single-turn chat.',
                     param='messages')
  system = ''.join(m['content'] + '\n\n' for m in messages if m['role'] == 'system')
  return system + users[0]['content']


# Parsing requests ------------------------------------------------------------------------------
def _number(body: dict, name: str, default, lo, hi, integer=False, lo_open=False):
  """body[name] (or default when absent / null) checked to lie in [lo, hi] (lo_open: (lo, hi])."""
  v = body.get(name)
  if v is None:
    return default
  kind = 'an integer' if integer else 'a number'
  ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
  inside = ok_type and not isinstance(v, bool) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
  if not inside:
    span = f'{"(" if lo_open else "["}{lo}, {hi if hi is not None else "inf"}]'
    raise BadRequest(f'{name} must be {kind} in {span}; got {json.dumps(v)}.', param=name)
  return v


def _stops(body: dict) -> tuple:
  stop = body.get('stop')
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP:
    raise BadRequest(f'stop must be a string or a list of at most {MAX_STOP} strings.', param='stop')
  return tuple(s for s in stop if s)


def _unsupported(body: dict) -> None:
  """OpenAI parameters this server does not implement are refused unless left at their default."""
  for name, default in (('presence_penalty', 0), ('frequency_penalty', 0), ('echo', False),
                        ('suffix', None), ('logit_bias', None), ('tools', None)):
    v = body.get(name)
    if v not in (None, default) and v != {}:
      raise BadRequest(f'{name} is not supported by this server; leave it out.', param=name)
  if body.get('best_of') not in (None, body.get('n', 1)):
    raise BadRequest('best_of is not supported by this server (it must equal n); leave it out.',
                     param='best_of')


def _sampling(body: dict, prompt_len_max: int, width: int, default_max) -> dict:
  """The engine.Request fields every choice of this request shares."""
  _unsupported(body)
  if 'stream' in body and not isinstance(body['stream'], bool):
    raise BadRequest('stream must be true or false.', param='stream')
  room = width - prompt_len_max
  if room < 1:
    raise BadRequest(f'The prompt has {prompt_len_max} tokens, which leaves no room in the '
                     f'context of {width} tokens; shorten it.', param='messages' if 'messages' in body else 'prompt')
  max_tokens = _number(body, 'max_completion_tokens', None, 1, None, integer=True)
  max_tokens = _number(body, 'max_tokens', max_tokens, 1, None, integer=True)
  max_tokens = min(default_max, room) if max_tokens is None else max_tokens
  if prompt_len_max + max_tokens > width:
    raise BadRequest(f'The prompt has {prompt_len_max} tokens and max_tokens={max_tokens}, more than '
                     f'the context of {width} tokens; shorten the prompt or lower max_tokens.',
                     param='max_tokens')
  return dict(max_tokens=max_tokens, temperature=float(_number(body, 'temperature', 1.0, 0, 2)),
              top_p=float(_number(body, 'top_p', 1.0, 0, 1, lo_open=True)),
              top_k=_number(body, 'top_k', 0, 0, None, integer=True),
              min_p=float(_number(body, 'min_p', 0.0, 0, 1)), stop=_stops(body))


def _prompts(body: dict, model: Model) -> list[list[int]]:
  """A completions prompt: a string, a list of strings, a list of ids or a list of id lists."""
  p = body.get('prompt')
  is_ids = lambda x: isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
  if isinstance(p, str):
    rows = [model.encode(p)]
  elif is_ids(p):
    rows = [list(p)]
  elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
    rows = [model.encode(x) for x in p]
  elif isinstance(p, list) and p and all(is_ids(x) for x in p):
    rows = [list(x) for x in p]
  else:
    raise BadRequest('prompt must be a string, a list of strings, a list of token ids or a list '
                     'of token id lists.', param='prompt')
  for r in rows:
    if not r:
      raise BadRequest('A prompt encodes to no tokens; send at least one character.', param='prompt')
    if min(r) < 0 or max(r) >= model.cfg.vocab_size:
      raise BadRequest(f'Prompt token ids must lie in [0, {model.cfg.vocab_size}).', param='prompt')
  return rows


def _messages(body: dict) -> list[dict]:
  msgs = body.get('messages')
  if not isinstance(msgs, list) or not msgs:
    raise BadRequest('messages must be a non-empty list of {"role", "content"} objects.', param='messages')
  out = []
  for m in msgs:
    content = m.get('content') if isinstance(m, dict) else None
    if isinstance(content, list):   # content parts: only text is understood here
      if not all(isinstance(c, dict) and c.get('type') == 'text' for c in content):
        raise BadRequest('Only text content parts are supported.', param='messages')
      content = ''.join(c.get('text', '') for c in content)
    if not isinstance(m, dict) or m.get('role') not in formats.ROLES or not isinstance(content, str):
      raise BadRequest(f'Every message needs a role in {list(formats.ROLES)} and a string content; '
                       f'got {json.dumps(m)[:80]}.', param='messages')
    out.append({'role': m['role'], 'content': content})
  return out


def _seeds(body: dict, n: int) -> list[int]:
  seed = body.get('seed')
  if seed is None:
    base = int(np.random.default_rng().integers(0, 2**31))
  elif isinstance(seed, int) and not isinstance(seed, bool):
    base = seed
  else:
    raise BadRequest(f'seed must be an integer; got {json.dumps(seed)}.', param='seed')
  return [(base + i) % 2**32 for i in range(n)]


# Requests as engine jobs ---------------------------------------------------------------------
class Job:
  """One HTTP request's choices in the engine; their updates arrive on `events`."""

  def __init__(self, kind: str, model: Model, prompts: list, shared: dict, n: int, seeds: list,
               top: int, logprobs: bool):
    self.kind, self.model, self.logprobs = kind, model, logprobs
    self.id = ('chatcmpl-' if kind == 'chat' else 'cmpl-') + uuid.uuid4().hex[:24]
    self.created = int(time.time())
    self.prompt_tokens = sum(len(p) for p in prompts)
    self.events: queue.Queue = queue.Queue()
    self.requests = []
    for p in prompts:
      for i in range(n):
        k = len(self.requests)
        self.requests.append(engine_lib.Request(
            prompt=p, seed=seeds[i], eos_ids=model.eos_ids, top_logprobs=top, **shared,
            on_update=lambda toks, lps, tops, res, k=k: self.events.put((k, toks, lps, tops, res))))

  def cancel(self, eng):
    for r in self.requests:
      if r.id >= 0:
        eng.cancel(r.id)

  def head(self, obj: str) -> dict:
    return {'id': self.id, 'object': obj, 'created': self.created, 'model': self.model.name}

  def usage(self, results: dict) -> dict:
    out = sum(len(r.tokens) for r in results.values())
    return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': out,
            'total_tokens': self.prompt_tokens + out}

  def logprobs_of(self, toks, lps, tops):
    """The choice's logprobs object (completions' or chat's layout), or None if not asked."""
    if not self.logprobs:
      return None
    text = self.model.token_text
    tops = tops or [[] for _ in toks]
    if self.kind == 'chat':
      entry = lambda i, lp: {'token': text(i), 'logprob': lp, 'bytes': list(text(i).encode())}
      return {'content': [{**entry(i, lp), 'top_logprobs': [entry(a, b) for a, b in top]}
                          for i, lp, top in zip(toks, lps, tops)]}
    return {'tokens': [text(i) for i in toks], 'token_logprobs': list(lps),
            'top_logprobs': [{text(a): b for a, b in top} for top in tops] if tops and tops[0] else None}

  def choice(self, k: int, res: engine_lib.Result) -> dict:
    lp = self.logprobs_of(res.tokens, res.raw_logprobs, res.top_logprobs)
    reason = 'length' if res.finish_reason == 'length' else 'stop'
    if self.kind == 'chat':
      return {'index': k, 'message': {'role': 'assistant', 'content': res.text},
              'logprobs': lp, 'finish_reason': reason}
    return {'index': k, 'text': res.text, 'logprobs': lp, 'finish_reason': reason}


def _held_back(text: str, stops) -> int:
  """How many trailing characters a stream must not send yet: an unfinished UTF-8 character
  (decoded as U+FFFD) or the start of a stop string."""
  keep = len(text) - len(text.rstrip('\ufffd'))
  body = text[:len(text) - keep]
  for s in stops:
    for j in range(min(len(s) - 1, len(body)), 0, -1):
      if body.endswith(s[:j]):
        keep = max(keep, len(text) - len(body) + j)
        break
  return keep


class Streamer:
  """Text deltas of one choice: tokens arrive, text that can no longer change goes out."""

  def __init__(self, model: Model, stops):
    self.model, self.stops, self.tokens, self.sent = model, stops, [], ''

  def add(self, toks) -> str:
    self.tokens += toks
    text = self.model.decode(self.tokens)
    cut = engine_lib.stop_cut(text, self.stops)   # the tokens that completed a stop string
    ready = cut if cut is not None else text[:len(text) - _held_back(text, self.stops)]
    return self._advance(ready)

  def finish(self, res: engine_lib.Result) -> str:
    return self._advance(res.text)

  def _advance(self, ready: str) -> str:
    if not ready.startswith(self.sent) or len(ready) <= len(self.sent):
      return ''
    delta, self.sent = ready[len(self.sent):], ready
    return delta


# The app: one engine thread, HTTP threads submit and write ------------------------------------
class App:

  def __init__(self, model: Model, config: ConfigDict):
    self.model, self.config = model, config
    self.engine = engine_lib.Engine(model.params, model.cfg, slots=config.slots,
                                    max_len=config.max_len or None, sync_every=config.sync_every,
                                    unsampleable=model.unsampleable, detokenize=model.decode,
                                    prefix_cache=config.prefix_cache)
    self.draining = threading.Event()
    self._halt = threading.Event()
    self._inflight = 0
    self._lock = threading.Lock()
    self.errors = 0
    self.thread = threading.Thread(target=self._loop, name='engine', daemon=True)
    self.thread.start()

  def _loop(self):
    while not self._halt.is_set():
      try:
        if not self.engine.step():
          self.engine.work.wait(0.05)
      except Exception:   # a failing step ends its requests with an error, not the server
        traceback.print_exc()
        self.errors += 1
        self.engine.fail_all()

  def close(self):
    self._halt.set()
    self.engine.work.set()
    self.thread.join(timeout=10)

  def track(self, delta: int):
    with self._lock:
      self._inflight += delta

  def idle(self) -> bool:
    return self._inflight == 0 and not self.engine.busy()

  def models(self) -> dict:
    return {'object': 'list', 'data': [{'id': self.model.name, 'object': 'model', 'created': 0,
                                        'owned_by': 'lm-research'}]}

  def job(self, kind: str, body: dict) -> Job:
    """Parse and check a request into a Job (BadRequest with one sentence if it cannot run)."""
    if not isinstance(body, dict):
      raise BadRequest('The request body must be a JSON object.')
    if body.get('model') != self.model.name:
      raise BadRequest(f'The model {body.get("model")!r} does not exist; this server serves '
                       f'{self.model.name!r} (GET /v1/models).', 404, 'model', 'model_not_found')
    if kind == 'chat':
      prompts = [self.model.chat_prompt(_messages(body))]
      top = _number(body, 'top_logprobs', 0, 0, engine_lib.TOP_LOGPROBS, integer=True)
      want = body.get('logprobs') or False
      if not isinstance(want, bool):
        raise BadRequest('logprobs must be true or false for chat completions.', param='logprobs')
      default_max = self.engine.width
    else:
      prompts = _prompts(body, self.model)
      top = _number(body, 'logprobs', None, 0, engine_lib.TOP_LOGPROBS, integer=True)
      want, top = top is not None, top or 0
      default_max = 16   # OpenAI's default for completions
    n = _number(body, 'n', 1, 1, MAX_N, integer=True)
    shared = _sampling(body, max(len(p) for p in prompts), self.engine.width, default_max)
    job = Job(kind, self.model, prompts, shared, n, _seeds(body, n), top, want)
    for r in job.requests:
      try:
        engine_lib.validate(r, self.model.cfg, self.engine.width, self.model.decode)
      except ConfigError as e:
        raise BadRequest(str(e).removeprefix('Bad request: ')) from None
    return job

  def submit(self, job: Job):
    if self.draining.is_set():
      raise BadRequest('The server is shutting down; retry elsewhere.', 503, kind='server_error')
    for r in job.requests:
      self.engine.submit(r)

  def results(self, job: Job) -> dict:
    """Wait for every choice; a dict index -> Result."""
    done, deadline = {}, time.time() + self.config.request_timeout
    while len(done) < len(job.requests):
      k, _, _, _, res = job.events.get(timeout=max(0.0, deadline - time.time()))
      if res is not None:
        done[k] = res
    return done

  def response(self, job: Job, done: dict) -> dict:
    if any(r.finish_reason == 'error' for r in done.values()):
      raise BadRequest('Generation failed inside the engine; see the server log.', 500,
                       kind='server_error')
    obj = 'chat.completion' if job.kind == 'chat' else 'text_completion'
    return {**job.head(obj), 'choices': [job.choice(k, done[k]) for k in sorted(done)],
            'usage': job.usage(done)}

  def chunks(self, job: Job, include_usage: bool):
    """The server-sent events of a streamed job, as JSON objects (then the caller's [DONE])."""
    obj = 'chat.completion.chunk' if job.kind == 'chat' else 'text_completion'
    streams = [Streamer(self.model, r.stop) for r in job.requests]
    done, deadline = {}, time.time() + self.config.request_timeout
    if job.kind == 'chat':
      for k in range(len(job.requests)):
        yield {**job.head(obj), 'choices': [{'index': k, 'delta': {'role': 'assistant', 'content': ''},
                                             'logprobs': None, 'finish_reason': None}]}
    while len(done) < len(job.requests):
      k, toks, lps, tops, res = job.events.get(timeout=max(0.0, deadline - time.time()))
      if res is not None and res.finish_reason == 'error':
        raise BadRequest('Generation failed inside the engine.', 500, kind='server_error')
      delta = streams[k].finish(res) if res is not None else streams[k].add(toks)
      reason = None if res is None else ('length' if res.finish_reason == 'length' else 'stop')
      if res is not None:
        done[k] = res
      if not delta and reason is None and not (toks and job.logprobs):
        continue
      lp = job.logprobs_of(toks, lps, tops) if toks else None
      choice = ({'index': k, 'delta': {'content': delta} if delta else {}, 'logprobs': lp}
                if job.kind == 'chat' else {'index': k, 'text': delta, 'logprobs': lp})
      yield {**job.head(obj), 'choices': [{**choice, 'finish_reason': reason}]}
    if include_usage:
      yield {**job.head(obj), 'choices': [], 'usage': job.usage(done)}


# HTTP ------------------------------------------------------------------------------------------
ROUTES = {'/v1/completions': 'completion', '/v1/chat/completions': 'chat'}


class Handler(http_server.BaseHTTPRequestHandler):
  server_version = 'lm-research-serve'

  def log_message(self, fmt, *args):   # quiet: one line per request would drown the console
    pass

  def _json(self, status: int, obj: dict):
    data = json.dumps(obj).encode()
    self.send_response(status)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def do_GET(self):
    app, path = self.server.app, self.path.split('?')[0]
    if path == '/health':
      self._json(503 if app.draining.is_set() else 200,
                 {'status': 'draining' if app.draining.is_set() else 'ok', 'model': app.model.name})
    elif path == '/v1/models':
      self._json(200, app.models())
    else:
      self._json(404, BadRequest(f'No route GET {path}; try /v1/models or /health.', 404).body())

  def do_POST(self):
    app, job = self.server.app, None
    app.track(+1)
    try:
      body = self._body()
      kind = ROUTES.get(self.path.split('?')[0])
      if kind is None:
        raise BadRequest(f'No route POST {self.path}; use /v1/completions or /v1/chat/completions.', 404)
      job = app.job(kind, body)
      app.submit(job)
      if body.get('stream'):
        self._stream(app, job, bool((body.get('stream_options') or {}).get('include_usage')))
      else:
        self._json(200, app.response(job, app.results(job)))
    except BadRequest as e:
      self._json(e.status, e.body())
    except queue.Empty:
      job.cancel(app.engine)
      self._json(504, BadRequest('The request timed out in the engine.', 504, kind='server_error').body())
    except (BrokenPipeError, ConnectionResetError):   # the client left: free its slots
      if job is not None:
        job.cancel(app.engine)
    except Exception as e:
      traceback.print_exc()
      if job is not None:
        job.cancel(app.engine)
      self._json(500, BadRequest(f'Internal error ({type(e).__name__}); see the server log.', 500,
                                 kind='server_error').body())
    finally:
      app.track(-1)

  def _body(self) -> dict:
    try:
      n = int(self.headers.get('Content-Length') or 0)
    except ValueError:
      raise BadRequest('Content-Length is not a number.') from None
    if n > MAX_BODY:
      raise BadRequest(f'The request body has {n} bytes, more than the {MAX_BODY} allowed.', 413)
    try:
      return json.loads(self.rfile.read(n) or b'null')
    except ValueError as e:
      raise BadRequest(f'The request body is not valid JSON ({e}).') from None

  def _stream(self, app: App, job: Job, include_usage: bool):
    self.send_response(200)
    self.send_header('Content-Type', 'text/event-stream')
    self.send_header('Cache-Control', 'no-cache')
    self.end_headers()
    send = lambda obj: (self.wfile.write(f'data: {json.dumps(obj)}\n\n'.encode()), self.wfile.flush())
    try:
      for chunk in app.chunks(job, include_usage):
        send(chunk)
    except (BadRequest, queue.Empty) as e:   # headers are out: the error goes as an event
      job.cancel(app.engine)
      err = e if isinstance(e, BadRequest) else BadRequest('The request timed out.', 504)
      send(err.body())
    self.wfile.write(b'data: [DONE]\n\n')
    self.wfile.flush()


class _Server(http_server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 128


class Serving:
  """A running server: `url`, `app` (model and engine); close() drains and stops it."""

  def __init__(self, config: ConfigDict):
    try:
      self.server = _Server((HOST, config.port), Handler)
    except OSError as e:
      raise ConfigError(f'Cannot listen on {HOST}:{config.port} ({e.strerror}); pick another port '
                        'or --config.port=0 for a free one.') from None
    try:
      self.app = self.server.app = App(Model(config.init_from, config.model_name), config)
    except BaseException:
      self.server.server_close()
      raise
    self.url = f'http://{HOST}:{self.server.server_port}'
    self._thread = threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.2},
                                    name='http', daemon=True)
    self._thread.start()

  def close(self, drain_seconds: float = 0.0) -> bool:
    """Refuse new requests, let those in flight finish (up to drain_seconds); True if all did."""
    self.app.draining.set()
    self.server.shutdown()
    deadline = time.time() + drain_seconds
    while not self.app.idle() and time.time() < deadline:
      time.sleep(0.05)
    drained = self.app.idle()
    self.app.close()
    self.server.server_close()
    return drained


# The experiment ------------------------------------------------------------------------------
def check(config: ConfigDict) -> None:
  if config.mode not in ('serve', 'bench'):
    raise ConfigError(f"mode={config.mode!r} is not known; use 'serve' or 'bench'.")
  if not 0 <= config.port <= 65535:
    raise ConfigError(f'port={config.port} is not a TCP port; use 1-65535, or 0 for a free one.')
  for key in ('slots', 'sync_every', 'prefix_cache'):
    if config[key] < 1:
      raise ConfigError(f'{key} must be >= 1, got {config[key]}.')


def run(config: ConfigDict, workdir: str) -> dict:
  check(config)
  os.makedirs(workdir, exist_ok=True)
  if config.mode == 'bench':
    return bench(config, workdir)
  serving = Serving(config)
  model = serving.app.model
  info = {'url': serving.url, 'pid': os.getpid(), 'model': model.name,
          'init_from': config.init_from, 'slots': config.slots, 'context': serving.app.engine.width}
  with open(os.path.join(workdir, 'server.json'), 'w') as f:
    json.dump(info, f)
  print(f'Serving {model.name!r} on {serving.url}/v1 ({config.slots} slots of '
        f'{serving.app.engine.width} tokens); SIGTERM or Ctrl-C drains and stops.', flush=True)
  stop, signum, old = threading.Event(), [], {}
  if threading.current_thread() is threading.main_thread():
    def on_signal(n, frame):
      signum.append(n)
      stop.set()
    for s in (signal.SIGTERM, signal.SIGINT):
      old[s] = signal.signal(s, on_signal)
  try:
    while not stop.wait(0.5):
      pass
  finally:
    drained = serving.close(config.drain_seconds)
    for s, h in old.items():
      signal.signal(s, h)
  print(f'Stopped by {signal.Signals(signum[0]).name}; requests in flight '
        f'{"all finished" if drained else "cut off after drain_seconds"}.', flush=True)
  raise trainer.Preempted(0, signum[0])


# Bench: the engine beside static batching -----------------------------------------------------
def workload(b: ConfigDict) -> list[tuple[list[int], int]]:
  """(prompt, response length) pairs: prompt lengths uniform, response lengths a mixture of
  the RLHF testbed's short line completions and the CoT testbed's long rationales."""
  rng = np.random.default_rng(b.seed)
  out = []
  for i in range(b.requests):
    p = int(rng.integers(b.prompt_min, b.prompt_max + 1))
    median, cap = (b.short_median, b.short_max) if rng.random() < b.short_fraction else (b.long_median, b.long_max)
    n = int(np.clip(round(median * rng.lognormal(0, b.sigma)), 1, cap))
    out.append((rng.integers(1, b.model.vocab_size, size=p).tolist(), n))
  return out


def _static(params, cfg, work, slots: int) -> dict:
  """decode.generate on consecutive batches of `slots` requests; a batch runs as long as its
  longest response, so rows that ended sit idle."""
  from lm import decode
  batches = [work[i:i + slots] for i in range(0, len(work), slots)]

  def go():
    for batch in batches:
      s = decode.SamplingConfig(temperature=0, max_new_tokens=max(n for _, n in batch))
      gen = decode.generate(params, [np.array(p) for p, _ in batch], jax.random.key(0), cfg=cfg,
                            sampling=s)
      jax.block_until_ready(gen.tokens)
    return sum(slots * max(n for _, n in batch) for batch in batches)   # row-steps

  width = max(decode._bucket(max(len(p) for p, _ in batch)) + decode._bucket(max(n for _, n in batch))
              for batch in batches)
  return {'go': go, 'width': width, 'slots': slots, 'cache_rows': slots}


def _engine(params, cfg, work, slots: int, width: int, sync_every: int) -> dict:
  # prefix_cache=1: the prompts differ, and the kept row is counted in the cache memory.
  eng = engine_lib.Engine(params, cfg, slots=slots, max_len=width, sync_every=sync_every,
                          prefix_cache=1)

  def go():
    before = eng.stats['decode_calls']
    eng.generate([engine_lib.Request(prompt=p, max_tokens=n) for p, n in work])
    return (eng.stats['decode_calls'] - before) * sync_every * slots   # row-steps

  return {'go': go, 'width': width, 'slots': slots, 'cache_rows': slots + 1}


def _time_interleaved(runs: dict, repeats: int) -> None:
  """Compile every run, then time them in turn `repeats` times, keeping each one's fastest:
  on a shared machine the load drifts, and alternating spreads it over all of them."""
  for r in runs.values():
    r['row_steps'] = r['go']()
    r['seconds'] = float('inf')
  for _ in range(repeats):
    for r in runs.values():
      t0 = time.perf_counter()
      r['go']()
      r['seconds'] = min(r['seconds'], time.perf_counter() - t0)


def bench(config: ConfigDict, workdir: str) -> dict:
  """Tokens/s of the engine and of static batching on one workload, same model and process.
  Cache memory: the engine's (slots + 1 kept prompt) x width beside the static batch's largest
  (slots x (prompt bucket + response bucket)); the engine runs at the static batch size and at
  the slot count the static batch's largest cache would hold."""
  from lm import model as model_lib
  from lm.config import ModelConfig
  b = config.bench
  cfg = ModelConfig.from_dict(b.model.to_dict())
  params = model_lib.init(cfg, jax.random.key(0))
  work = workload(b)
  useful = sum(n for _, n in work)
  width = b.prompt_max + max(b.short_max, b.long_max)
  kv_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * np.dtype(cfg.dtype).itemsize
  static = _static(params, cfg, work, b.slots)
  equal_slots = static['slots'] * static['width'] // width - 1   # the kept prompt row
  runs = {'static': static}
  for slots in dict.fromkeys((b.slots, equal_slots)):
    runs[f'engine_{slots}_slots'] = _engine(params, cfg, work, slots, width, config.sync_every)
  _time_interleaved(runs, b.repeats)
  table = {}
  for name, r in runs.items():
    table[name] = {'tokens_per_s': round(useful / r['seconds'], 1), 'seconds': round(r['seconds'], 2),
                   'slots': r['slots'], 'cache_bytes': r['cache_rows'] * r['width'] * kv_token,
                   'row_utilisation': round(useful / r['row_steps'], 3),
                   'ms_per_step': round(1e3 * r['seconds'] / (r['row_steps'] / r['slots']), 2),
                   'speedup_vs_static': round(static['seconds'] / r['seconds'], 2)}
  report = {'requests': len(work), 'useful_tokens': useful, 'sync_every': config.sync_every,
            'repeats': b.repeats,
            'runs': table, 'engine_programs': engine_lib.compiled_programs(),
            'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
            'model': b.model.to_dict()}
  with open(os.path.join(workdir, 'bench.json'), 'w') as f:
    json.dump(report, f, indent=2)
  for name, row in table.items():
    print(f'{name:>18}: ' + ', '.join(f'{k} {v}' for k, v in row.items()), flush=True)
  return report
