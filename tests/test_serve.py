"""The OpenAI-compatible server (experiments/serve.py) with the official `openai` client on
loopback: every response equals what the engine gives alone (streamed or not, greedy or seeded,
chat or completion), a bounded concurrent load runs without errors, bad requests get a JSON
error sentence and the server goes on, a client that leaves mid-stream is cleaned up, and
SIGTERM drains the requests in flight."""
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

openai = pytest.importorskip('openai', reason='needs the [test] extra (openai)')

from experiments import pretrain, serve  # noqa: E402
from experiments.configs import serve as serve_config  # noqa: E402
from lm import engine as engine_lib  # noqa: E402
from tests.test_pretrain import tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A char-level model, 2 training steps (its samples are noise, which is all a server needs)."""
  from tests.conftest import TINY_SHAKESPEARE
  d = tmp_path_factory.mktemp('serve')
  (d / 'corpus.txt').write_text(TINY_SHAKESPEARE.read_text(encoding='utf-8')[:60000], encoding='utf-8')
  c = tiny_config(str(d / 'corpus.txt'), steps=2, eval_every=0, checkpoint_every=2, samples=0)
  c.model.max_seq_len = 64
  pretrain.run(c, str(d / 'works'))
  return d / 'works'


def config(run_dir, **kw):
  c = serve_config.get_config()
  c.update(init_from=str(run_dir), port=0, slots=4, sync_every=2, **kw)
  return c


@pytest.fixture(scope='module')
def served(run_dir):
  s = serve.Serving(config(run_dir))
  yield s
  s.close(5)


@pytest.fixture(scope='module')
def client(served):
  return openai.OpenAI(base_url=served.url + '/v1', api_key='unused', max_retries=0, timeout=60)


def alone(served, prompts, **kw):
  """What a fresh engine gives for these prompts (texts or chat token lists), nothing else running."""
  m = served.app.model
  eng = engine_lib.Engine(m.params, m.cfg, slots=2, unsampleable=m.unsampleable, detokenize=m.decode)
  ids = [m.encode(p) if isinstance(p, str) else p for p in prompts]
  return eng.generate([engine_lib.Request(prompt=p, eos_ids=m.eos_ids, **kw) for p in ids])


def stream_text(stream):
  parts, reasons = {}, {}
  for chunk in stream:
    for c in chunk.choices:
      delta = c.delta.content if hasattr(c, 'delta') else c.text
      parts[c.index] = parts.get(c.index, '') + (delta or '')
      if c.finish_reason:
        reasons[c.index] = c.finish_reason
  return [parts[i] for i in sorted(parts)], [reasons[i] for i in sorted(reasons)]


def test_completions_equal_the_engine_alone(served, client):
  name = served.app.model.name
  r = client.completions.create(model=name, prompt='ROMEO:', max_tokens=20, temperature=0, logprobs=2)
  want = alone(served, ['ROMEO:'], max_tokens=20, top_logprobs=2)[0]
  assert r.choices[0].text == want.text and len(want.text) > 0
  assert r.choices[0].finish_reason == 'length' and r.usage.completion_tokens == 20
  np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs, want.raw_logprobs, atol=1e-5)
  assert len(r.choices[0].logprobs.top_logprobs[0]) == 2
  # Sampled, n=2, a stop string: choice i draws with seed + i, streamed or not.
  kw = dict(model=name, prompt=['JULIET:', 'KING'], max_tokens=24, temperature=1.0, top_p=0.9,
            n=2, seed=11, stop=['\n\n'])
  r = client.completions.create(**kw)
  want = [w for p in kw['prompt'] for w in
          [alone(served, [p], max_tokens=24, temperature=1.0, top_p=0.9, seed=s, stop=('\n\n',))[0]
           for s in (11, 12)]]
  assert [c.text for c in r.choices] == [w.text for w in want]
  assert len({c.text for c in r.choices}) > 1
  texts, reasons = stream_text(client.completions.create(**kw, stream=True))
  assert texts == [w.text for w in want]
  assert reasons == ['length' if w.finish_reason == 'length' else 'stop' for w in want]
  # A stop string the greedy text contains: the stream never shows its first characters.
  full = alone(served, ['ROMEO:'], max_tokens=30)[0].text
  stop = full[8:12]
  kw = dict(model=name, prompt='ROMEO:', max_tokens=30, temperature=0, stop=stop)
  want = full[:full.index(stop)]
  assert client.completions.create(**kw).choices[0].text == want
  assert stream_text(client.completions.create(**kw, stream=True)) == ([want], ['stop'])


def test_stream_holds_back_what_may_still_change():
  class Chars:
    decode = staticmethod(lambda ids: ''.join(chr(i) if i < 0xD800 else '\ufffd' for i in ids))
  s = serve.Streamer(Chars, ('XYZ',))
  assert s.add([ord('a'), ord('b')]) == 'ab'
  assert s.add([ord('X'), ord('Y')]) == ''        # may be the start of XYZ
  assert s.add([ord('Q')]) == 'XYQ'
  assert s.add([0xD800]) == ''                    # half a character
  assert s.finish(engine_lib.Result([], [], [], 'stop', text='abXYQé')) == 'é'


def test_chat_equals_the_engine_alone(served, client):
  msgs = [{'role': 'system', 'content': 'Speak verse.'}, {'role': 'user', 'content': 'Who goes?'}]
  m = served.app.model
  prompt = m.chat_prompt(msgs)    # a pretraining run has no template: a plain transcript
  assert m.decode(prompt) == 'system: Speak verse.\nuser: Who goes?\nassistant:'
  want = alone(served, [prompt], max_tokens=16, temperature=0.7, seed=5)[0]
  kw = dict(model=m.name, messages=msgs, max_tokens=16, temperature=0.7, seed=5)
  r = client.chat.completions.create(**kw)
  assert r.choices[0].message.content == want.text and r.choices[0].message.role == 'assistant'
  assert stream_text(client.chat.completions.create(**kw, stream=True))[0] == [want.text]
  r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
  lp = r.choices[0].logprobs.content
  assert [t.logprob for t in lp] == pytest.approx(want.raw_logprobs, abs=1e-5)
  assert all(len(t.top_logprobs) == 3 for t in lp)


def test_chat_uses_the_runs_instruction_template(served, monkeypatch):
  """An SFT run tuned with a text template takes one user turn as its instruction."""
  m = served.app.model
  monkeypatch.setattr(m, 'template', 'none')
  assert m.chat_prompt([{'role': 'user', 'content': 'Who goes?'}]) == m.encode('Who goes?')
  with pytest.raises(serve.BadRequest, match='single-turn'):
    m.chat_prompt([{'role': 'user', 'content': 'A'}, {'role': 'assistant', 'content': 'B'},
                   {'role': 'user', 'content': 'C'}])
  # A tokenizer that carries a chat_template (an hf: folder's) renders chats through formats.
  monkeypatch.setattr(m, 'template', None)
  monkeypatch.setattr(m.tok, 'chat_template', '{{ messages }}', raising=False)
  seen = []
  monkeypatch.setattr(serve.formats, 'prompt_tokens', lambda ex, t, tok: seen.append((ex, t)) or [7])
  assert m.chat_prompt([{'role': 'user', 'content': 'Hi'}]) == [7]
  assert seen == [({'messages': [{'role': 'user', 'content': 'Hi'}]}, 'chat')]


def test_models_and_health(served, client):
  assert [m.id for m in client.models.list().data] == [served.app.model.name]
  conn = http.client.HTTPConnection('127.0.0.1', served.server.server_port, timeout=10)
  conn.request('GET', '/health')
  assert json.loads(conn.getresponse().read())['status'] == 'ok'


def post(served, path, raw: bytes):
  conn = http.client.HTTPConnection('127.0.0.1', served.server.server_port, timeout=30)
  conn.request('POST', path, raw, {'Content-Type': 'application/json'})
  resp = conn.getresponse()
  return resp.status, json.loads(resp.read())


BAD = [  # (body, status, words of the one-sentence message)
    ({'model': 'gpt-4', 'prompt': 'x'}, 404, 'does not exist'),
    ({'model': 'works', 'prompt': 'x' * 70}, 400, 'context of 64 tokens'),
    ({'model': 'works', 'prompt': 'x', 'max_tokens': 64}, 400, 'context of 64 tokens'),
    ({'model': 'works', 'prompt': 'x', 'temperature': -1}, 400, 'temperature must be'),
    ({'model': 'works', 'prompt': 'x', 'top_p': 0}, 400, 'top_p must be'),
    ({'model': 'works', 'prompt': 'x', 'n': 0}, 400, 'n must be'),
    ({'model': 'works', 'prompt': 'x', 'max_tokens': 'ten'}, 400, 'max_tokens must be'),
    ({'model': 'works', 'prompt': 'x', 'stop': [1]}, 400, 'stop must be'),
    ({'model': 'works', 'prompt': 'x', 'logprobs': 9}, 400, 'logprobs must be'),
    ({'model': 'works', 'prompt': 'x', 'presence_penalty': 1}, 400, 'not supported'),
    ({'model': 'works', 'prompt': 'x', 'seed': 'a'}, 400, 'seed must be'),
    ({'model': 'works', 'prompt': ''}, 400, 'no tokens'),
    ({'model': 'works', 'prompt': [999]}, 400, 'token ids must lie'),
    ({'model': 'works', 'prompt': '\u4e2d'}, 400, 'cannot be encoded'),
    ({'model': 'works'}, 400, 'prompt must be'),
    ([1, 2], 400, 'JSON object'),
]


@pytest.mark.parametrize('body,status,words', BAD, ids=[b[2] for b in BAD])
def test_bad_requests_get_one_sentence(served, body, status, words):
  got, out = post(served, '/v1/completions', json.dumps(body).encode())
  assert got == status and words in out['error']['message']
  assert out['error']['message'].endswith('.') and out['error']['message'].count('. ') == 0


def test_bad_json_routes_and_chat_then_still_serving(served, client):
  assert post(served, '/v1/completions', b'{"model": "works", "prompt": ')[0] == 400
  status, out = post(served, '/v1/chat/completions', json.dumps({'model': 'works', 'messages': [{'role': 'bot'}]}).encode())
  assert status == 400 and 'role' in out['error']['message']
  assert post(served, '/v1/embeddings', b'{}')[0] == 404
  with pytest.raises(openai.NotFoundError):
    client.completions.create(model='nope', prompt='x')
  r = client.completions.create(model='works', prompt='A', max_tokens=3, temperature=0)
  assert r.usage.completion_tokens == 3


def test_client_leaving_mid_stream_is_cleaned_up(served, client):
  body = json.dumps({'model': 'works', 'prompt': 'LEAR:', 'max_tokens': 58, 'stream': True,
                     'temperature': 0}).encode()
  eng = served.app.engine
  cancelled = eng.stats['finished_cancelled']
  sock = socket.create_connection(('127.0.0.1', served.server.server_port), timeout=30)
  sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Content-Length: %d\r\n\r\n' % len(body) + body)
  got = b''
  while b'data: ' not in got:              # the stream started
    got += sock.recv(4096)
  sock.close()
  deadline = time.time() + 20
  while (eng.busy() or served.app._inflight) and time.time() < deadline:
    time.sleep(0.05)
  assert not eng.busy() and served.app._inflight == 0
  assert eng.stats['finished_cancelled'] == cancelled + 1   # ended early, its slot freed
  assert client.completions.create(model='works', prompt='B', max_tokens=2).usage.completion_tokens == 2


def test_concurrent_streaming_load(served, client):
  """64 streaming requests at once, each checked against the engine alone; a time limit."""
  rng = np.random.default_rng(0)
  words = ['ROMEO', 'JULIET', 'KING', 'LEAR', 'HAMLET', 'First Citizen']
  reqs = [dict(prompt=f'{words[i % 6]}:' + ' ' * int(rng.integers(0, 6)), max_tokens=int(rng.integers(4, 30)),
               temperature=float(rng.choice([0.0, 0.8])), seed=i) for i in range(64)]
  def one(r):
    t0 = time.perf_counter()
    texts, _ = stream_text(client.completions.create(model='works', stream=True, **r))
    return texts[0], time.perf_counter() - t0
  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    got = list(pool.map(one, reqs, timeout=120))
  wall = time.perf_counter() - t0
  want = [alone(served, [r['prompt']], max_tokens=r['max_tokens'], temperature=r['temperature'],
                seed=r['seed'])[0] for r in reqs]
  assert [g[0] for g in got] == [w.text for w in want]
  lat = np.array([g[1] for g in got])
  tokens = sum(len(w.tokens) for w in want)
  print(f'\nload: 64 streams, {tokens} tokens in {wall:.2f}s = {tokens / wall:.0f} tokens/s, '
        f'{64 / wall:.1f} requests/s; latency p50 {np.percentile(lat, 50):.2f}s '
        f'p99 {np.percentile(lat, 99):.2f}s')
  assert served.app.errors == 0


def test_sigterm_drains_in_flight_requests(run_dir, tmp_path):
  """8 streams through one slot (about 460 decode steps): SIGTERM after the first token; every
  stream, the queued ones too, still ends complete, and the process exits 143."""
  wd = tmp_path / 'srv'
  cmd = [sys.executable, '-m', 'experiments.run', f'--config={ROOT}/experiments/configs/serve.py',
         f'--workdir={wd}', f'--config.init_from={run_dir}', '--config.port=0', '--config.slots=1',
         '--config.sync_every=1']
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 120
    while not (wd / 'server.json').exists():
      assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
      time.sleep(0.2)
    url = json.loads((wd / 'server.json').read_text())['url']
    c = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=120)
    streams = [c.completions.create(model='works', prompt='ROMEO:', max_tokens=57,
                                    temperature=0, stream=True) for i in range(8)]
    first = next(iter(streams[0]))
    proc.send_signal(signal.SIGTERM)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      rest = list(pool.map(stream_text, streams, timeout=120))
    assert [r[1] for r in rest] == [['length']] * 8
    assert len(first.choices[0].text + rest[0][0][0]) == 57
    assert all(len(r[0][0]) == 57 for r in rest[1:])
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert 'all finished' in proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_bench_mode_writes_the_comparison(tmp_path):
  """mode=bench on a tiny random model: static beside the engine at the static batch size and at
  equal cache memory; row utilisation (no timing in it) is the engine's gain."""
  c = serve_config.get_config()
  c.mode = 'bench'
  c.bench.update(requests=24, repeats=1, slots=4, prompt_max=16, long_max=64)
  c.bench.model.update(d_model=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=128)
  serve.run(c, str(tmp_path))
  rep = json.loads((tmp_path / 'bench.json').read_text())
  runs = rep['runs']
  assert set(runs) >= {'static', 'engine_4_slots'} and len(runs) == 3
  for r in runs.values():
    assert 0 < r['row_utilisation'] <= 1 and r['tokens_per_s'] > 0
  assert runs['engine_4_slots']['row_utilisation'] > 1.5 * runs['static']['row_utilisation']
  equal = [r for n, r in runs.items() if n not in ('static', 'engine_4_slots')][0]
  row = 80 * 2 * 1 * 2 * 16 * 4   # one engine row: 16 + 64 columns x (k, v) x layer x heads x dim x 4 B
  assert equal['cache_bytes'] <= runs['static']['cache_bytes'] < equal['cache_bytes'] + row
