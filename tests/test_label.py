"""The `label` experiment: rankings from the page's handler appended in the reward reader's
K-wise format (read back by experiments/reward_data.read), refused submissions write nothing,
a restart skips labelled and skipped prompts, torn lines, start-up errors, and a real headless
Chromium that ranks by clicking (skipped without chromium + playwright)."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from wsgiref.util import setup_testing_defaults

import pytest

from experiments import label
from experiments.stages import policy, reward_data
from experiments.configs import label as label_config
from lm import sharding
from lm.config import ConfigError
from tests import rl_fixtures

PROMPTS = ['And so', 'The king', 'O, I will', 'Methought this', 'Whilst I am', 'Good night']
K = 3


def config(pol_dir, prompts_file, **kw):
  c = label_config.get_config()
  c.update(init_from=pol_dir, prompts_file=prompts_file, port=0, queue=2, **kw)
  c.rollout.update(samples=K, max_new_tokens=8, batch_size=6)
  return c


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A tiny random policy, a prompts file, and a sampler of K responses per prompt (compiled
  once for the module: run() below reuses the same program)."""
  d = tmp_path_factory.mktemp('label')
  pol_dir = rl_fixtures.policy_run(d / 'pol', n_layers=1)   # compile-bound: one layer
  (d / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n', encoding='utf-8')
  c = config(pol_dir, str(d / 'prompts.txt'))
  pol = policy.open_policy(pol_dir)
  mesh = sharding.make_mesh(c.mesh.to_dict())
  params = pol.source.restore_params(mesh, pol.cfg)
  ids = policy.encode_prompts(pol, PROMPTS, 64 - c.rollout.max_new_tokens)
  sample_fn = label.policy_sampler(pol, params, dict(zip(PROMPTS, ids)), c, mesh)
  return d, pol_dir, sample_fn


def labeller(path, sample_fn, **kw):
  lab = label.Labeller(PROMPTS, sample_fn, str(path), queue_size=2, batch_prompts=2, **kw).start()
  assert lab.wait_ready(120)
  return lab


def call(app, method, path, body=None, raw=None):
  env = {}
  setup_testing_defaults(env)
  data = raw if raw is not None else (b'' if body is None else json.dumps(body).encode())
  env.update(REQUEST_METHOD=method, PATH_INFO=path, CONTENT_LENGTH=str(len(data)),
             CONTENT_TYPE='application/json')
  env['wsgi.input'] = io.BytesIO(data)
  status = []
  out = b''.join(app(env, lambda s, h: status.append(s)))
  code = int(status[0].split()[0])
  return code, (json.loads(out) if out.startswith(b'{') else out.decode())


def test_rankings_append_in_the_reward_format_and_bad_ones_write_nothing(setup, tmp_path):
  _, _, sample_fn = setup
  path = tmp_path / 'prefs.jsonl'
  lab = labeller(path, sample_fn)
  app = label.make_app(lab)
  code, html = call(app, 'GET', '/')
  assert code == 200 and 'Submit ranking' in html
  code, s = call(app, 'GET', '/api/item')
  assert code == 200 and s['status'] == 'ready'
  item = s['item']
  assert item['prompt'] == PROMPTS[0] and len(item['responses']) == K
  assert all(isinstance(r, str) and r.strip() for r in item['responses'])

  bad = [({'id': item['id'], 'ranks': [0, None, 1]}, 'Rank every response'),
         ({'id': item['id'], 'ranks': [0, 1]}, f'has {K} responses but 2'),
         ({'id': item['id'], 'ranks': [0, 1, 7]}, 'place 7'),
         ({'id': item['id'], 'ranks': [0, 1, 'x']}, "place 'x'"),
         ({'id': item['id'], 'ranks': [0, True, 1]}, 'place True'),
         ({'id': item['id'], 'ranks': 'best'}, 'list of 3'),
         ({'id': item['id'] + 1, 'ranks': [0, 1, 2]}, 'not the one being labelled'),
         ({'ranks': [0, 1, 2]}, 'names no item')]
  for body, msg in bad:
    code, r = call(app, 'POST', '/api/rank', body)
    assert code == 400 and msg in r['error'], (body, r)
  code, r = call(app, 'POST', '/api/rank', raw=b'{not json')
  assert code == 400 and 'not JSON' in r['error']
  assert not path.exists()                                  # nothing written
  assert lab.counts['rejected'] == len(bad) + 1

  # a valid ranking with a tie (places 1st, 3rd, 1st -> dense ranks 0, 1, 0)
  code, r = call(app, 'POST', '/api/rank', {'id': item['id'], 'ranks': [0, 2, 0]})
  assert code == 200 and r['saved']['ranks'] == [0, 1, 0]
  assert r['item']['id'] != item['id']                      # the next prompt is shown
  second = r['item']
  code, r = call(app, 'POST', '/api/rank', {'id': second['id'], 'ranks': [2, 0, 1]})
  assert code == 200
  assert lab.wait_ready(120)                                # the sampler refills the queue
  code, r = call(app, 'POST', '/api/tie', {'id': call(app, 'GET', '/api/item')[1]['item']['id']})
  assert code == 200 and r['saved']['tie'] and r['saved']['ranks'] == [0] * K
  lab.close()

  lines = path.read_text(encoding='utf-8').splitlines()
  assert len(lines) == 3
  recs = [json.loads(l) for l in lines]
  assert recs[0]['prompt'] == PROMPTS[0] and recs[0]['responses'] == item['responses']
  assert recs[1]['ranks'] == [2, 0, 1]
  split, report = reward_data.read(str(path), K, 0.0)
  assert [(r['prompt'], r['responses'], r['ranks']) for r in split['train']] == \
      [(x['prompt'], x['responses'], x['ranks']) for x in recs[:2]]
  assert report['skipped'] == {'tie': 1}                    # all-equal: a counted skip


def test_restart_skips_labelled_and_skipped_prompts(setup, tmp_path):
  _, _, sample_fn = setup
  path = tmp_path / 'prefs.jsonl'
  lab = labeller(path, sample_fn)
  app = label.make_app(lab)
  first = call(app, 'GET', '/api/item')[1]['item']
  assert call(app, 'POST', '/api/rank', {'id': first['id'], 'ranks': [0, 1, 2]})[0] == 200
  second = call(app, 'GET', '/api/item')[1]['item']
  assert call(app, 'POST', '/api/skip', {'id': second['id']})[0] == 200
  lab.close()
  before = path.read_bytes()
  with open(label.skip_file(str(path))) as f:
    assert json.loads(f.read())['prompt'] == second['prompt']

  lab = labeller(path, sample_fn, max_items=1)
  assert lab.counts['already_labelled'] == 2
  assert [p for _, p in lab.todo] == PROMPTS[2:]
  app = label.make_app(lab)
  third = call(app, 'GET', '/api/item')[1]['item']
  assert third['prompt'] == PROMPTS[2]
  code, r = call(app, 'POST', '/api/rank', {'id': third['id'], 'ranks': [1, 0, 2]})
  assert code == 200 and r['status'] == 'done' and 'max_items=1' in r['message']
  assert lab.stopped.is_set()
  code, r = call(app, 'POST', '/api/rank', {'id': third['id'], 'ranks': [1, 0, 2]})
  assert code == 400 and 'stopped' in r['error']
  lab.close()
  after = path.read_bytes()
  assert after.startswith(before) and after.count(b'\n') == 2   # appended, nothing rewritten


def test_every_prompt_labelled_stops(tmp_path):
  path = tmp_path / 'p.jsonl'
  path.write_text(''.join(json.dumps({'prompt': p, 'responses': ['a', 'b'], 'ranks': [0, 1]}) + '\n'
                          for p in PROMPTS))
  lab = label.Labeller(PROMPTS, lambda ps, i: pytest.fail('nothing to sample'), str(path)).start()
  assert lab.wait_ready(5) and lab.stopped.is_set()
  assert lab.state()['status'] == 'done' and lab.counts['already_labelled'] == len(PROMPTS)


def test_duplicate_and_empty_responses_dropped(tmp_path):
  fake = lambda ps, i: [['x', 'x', ' '], ['a', 'b', 'a']][:len(ps)]
  lab = label.Labeller(['p', 'q'], fake, str(tmp_path / 'p.jsonl'), batch_prompts=2).start()
  assert lab.wait_ready(5)
  s = lab.state()
  assert s['item']['prompt'] == 'q' and s['item']['responses'] == ['a', 'b']
  assert lab.counts['too_few_responses'] == 1 and lab.counts['duplicate_responses'] == 2
  assert lab.counts['empty_responses'] == 1
  lab.close()


def test_torn_last_line_is_closed_not_merged(tmp_path):
  path = tmp_path / 'p.jsonl'
  path.write_bytes(b'{"prompt": "x", "respo')                 # a crash mid-write
  rec = {'prompt': 'y', 'responses': ['a', 'b'], 'ranks': [1, 0]}
  label.append_line(str(path), rec)
  lines = path.read_bytes().split(b'\n')
  assert lines[0] == b'{"prompt": "x", "respo' and json.loads(lines[1]) == rec
  split, report = reward_data.read(str(path), 2, 0.0)
  assert split['train'] == [rec] and sum(report['skipped'].values()) == 1


def test_check_ranks():
  assert label.check_ranks([3, 0, 3, 1], 4) == [2, 0, 2, 1]   # dense, as rl/gold.ranks
  assert label.check_ranks([1, 1], 2) == [0, 0]
  for bad in ([0, None], [0], [-1, 0], [0, 1.0], None):
    with pytest.raises(label.Rejected):
      label.check_ranks(bad, 2)


def test_start_up_errors(setup, tmp_path):
  d, pol_dir, _ = setup
  good = config(pol_dir, str(d / 'prompts.txt'))
  for key, value, msg in [('rollout.samples', 1, 'rollout.samples=1'), ('port', 70000, 'not a TCP port'),
                          ('max_items', -1, 'max_items'), ('prompts_file', str(tmp_path / 'no'),
                                                           'does not exist')]:
    c = config(pol_dir, str(d / 'prompts.txt'))
    *parents, leaf = key.split('.')
    section = c
    for p in parents:
      section = section[p]
    section[leaf] = value
    with pytest.raises(ConfigError, match=msg):
      label.run(c, str(tmp_path / 'w'))
  with label.serve(None, 0) as busy:                          # a port in use: one sentence
    good.port = busy.server_port
    with pytest.raises(ConfigError, match='Cannot listen'):
      label.run(good, str(tmp_path / 'w'))


def _start(c, workdir):
  """run() in a thread; its URL once the page is up."""
  out = {}
  t = threading.Thread(target=lambda: out.update(report=label.run(c, workdir)), daemon=True)
  t.start()
  server = os.path.join(workdir, 'server.json')
  for _ in range(600):
    if os.path.exists(server):
      break
    assert t.is_alive(), 'run() ended before serving'
    time.sleep(0.1)
  return t, out, json.load(open(server))['url']


def _post(url, body=None):
  req = urllib.request.Request(url, json.dumps(body or {}).encode(), {'Content-Type': 'application/json'})
  return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_run_serves_and_shuts_down_from_the_endpoint(setup, tmp_path):
  d, pol_dir, _ = setup
  c = config(pol_dir, str(d / 'prompts.txt'))
  t, out, url = _start(c, str(tmp_path / 'w'))
  assert url.startswith('http://127.0.0.1:')
  assert _post(url + 'api/shutdown')['status'] == 'done'
  t.join(60)
  assert not t.is_alive() and 'shutdown' in out['report']['reason']
  with pytest.raises(OSError):                                # the port is closed
    urllib.request.urlopen(url, timeout=5)


def _browser():
  try:
    from playwright.sync_api import sync_playwright
  except ImportError:
    sync_playwright = None
  exe = shutil.which('chromium') or ('/usr/bin/chromium' if os.path.exists('/usr/bin/chromium') else None)
  if sync_playwright is None or exe is None:
    pytest.skip('needs chromium (apt-get install chromium) and playwright')
  return sync_playwright, exe


CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def test_headless_chromium_ranks_by_clicking(setup, tmp_path):
  sync_playwright, exe = _browser()
  d, pol_dir, _ = setup
  c = config(pol_dir, str(d / 'prompts.txt'), max_items=2)
  workdir = str(tmp_path / 'w')
  t, out, url = _start(c, workdir)
  path = os.path.join(workdir, label.FILE)
  try:
    with sync_playwright() as p:
      browser = p.chromium.launch_persistent_context(
          str(tmp_path / 'profile'), executable_path=exe, headless=True, args=CHROMIUM_ARGS)
      page = browser.new_page()
      page.goto(url)
      page.wait_for_selector('#cards .card', timeout=120_000)
      assert page.inner_text('#prompt') == PROMPTS[0]
      assert page.locator('#cards .card').count() == K
      shown = [page.locator(f'.card[data-response="{j}"] .text span').nth(2).text_content()
               for j in range(K)]

      # incomplete: refused on the page, nothing written
      page.click('.ranks button[data-response="0"][data-rank="1"]')
      page.click('#submit')
      page.wait_for_selector('#message.error')
      assert 'Rank every response' in page.inner_text('#message')
      assert not os.path.exists(path)

      # C best, A second, B last; a click on a chosen place unchoses it, so choose A again
      page.click('.ranks button[data-response="0"][data-rank="1"]')
      page.click('.ranks button[data-response="0"][data-rank="1"]')
      page.click('.ranks button[data-response="2"][data-rank="0"]')
      page.click('.ranks button[data-response="1"][data-rank="2"]')
      assert page.locator('.card.ranked').count() == K
      page.screenshot(path=str(tmp_path / 'label.png'), full_page=True)
      page.click('#submit')
      page.wait_for_function(f'document.getElementById("prompt").textContent !== {json.dumps(PROMPTS[0])}')
      assert page.inner_text('#message') == 'Saved.'
      assert page.inner_text('#prompt') == PROMPTS[1]

      page.click('#tie')                                      # the second: all equal
      page.wait_for_selector('#message.ok')
      page.wait_for_function('document.getElementById("main").hidden')
      assert 'max_items=2' in page.inner_text('#message')
      browser.close()
  finally:
    t.join(20)                          # after max_items run() closes the server by itself
    if t.is_alive():
      with contextlib.suppress(OSError):   # it may close between the check and the post
        _post(url + 'api/shutdown')
    t.join(60)
  assert not t.is_alive()
  if os.environ.get('LABEL_SCREENSHOT'):
    shutil.copy(tmp_path / 'label.png', os.environ['LABEL_SCREENSHOT'])
  recs = [json.loads(l) for l in open(path, encoding='utf-8')]
  assert len(recs) == 2
  assert recs[0]['prompt'] == PROMPTS[0] and recs[0]['ranks'] == [1, 2, 0]
  assert recs[0]['responses'] == shown                      # the texts the person saw
  assert recs[1]['tie'] and recs[1]['ranks'] == [0] * K
  split, report = reward_data.read(path, K, 0.0)
  assert len(split['train']) == 1 and report['skipped'] == {'tie': 1}
  assert out['report']['counts']['ranked'] == 1 and out['report']['counts']['tied'] == 1


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_keeps_the_file(setup, tmp_path):
  """The launcher in a subprocess: SIGTERM ends it with 143 after saving; a rerun continues."""
  d, pol_dir, _ = setup
  workdir = tmp_path / 'w'
  args = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/label.py',
          f'--workdir={workdir}', f'--config.init_from={pol_dir}',
          f'--config.prompts_file={d / "prompts.txt"}', '--config.port=0',
          f'--config.rollout.samples={K}', '--config.rollout.max_new_tokens=8',
          '--config.rollout.batch_size=6']
  proc = subprocess.Popen(args, cwd=os.path.dirname(os.path.dirname(__file__)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(1200):
      if (workdir / 'server.json').exists():
        break
      time.sleep(0.1)
    url = json.load(open(workdir / 'server.json'))['url']
    for _ in range(600):
      s = json.loads(urllib.request.urlopen(url + 'api/item', timeout=30).read())
      if s['status'] == 'ready':
        break
      time.sleep(0.2)
    _post(url + 'api/rank', {'id': s['item']['id'], 'ranks': [0, 1, 2]})
    proc.terminate()
    assert proc.wait(60) == 143, proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert len((workdir / label.FILE).read_text().splitlines()) == 1
  assert json.load(open(workdir / 'label_report.json'))['reason'] == 'Stopped by SIGTERM.'
