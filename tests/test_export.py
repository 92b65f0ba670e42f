"""Export to Hugging Face: a char-level LoRA SFT run (merged) and a BPE pretraining run load with
AutoTokenizer + AutoModelForCausalLM and give our ids, our logits and our greedy tokens."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs the [hf] extra (torch, transformers)')
transformers = pytest.importorskip('transformers', reason='needs the [hf] extra (torch, transformers)')

from data import tokenizers  # noqa: E402
from experiments import export, pretrain, sft
from experiments.stages import stage  # noqa: E402
from lm import decode, model, sharding  # noqa: E402
from lm.config import ConfigError  # noqa: E402
from tests.test_pretrain import tiny_config  # noqa: E402
from tests.test_sft import sft_config  # noqa: E402

SAMPLE = 'ROMEO:\nBut soft, what light?\n\nJULIET: Ay me!  '   # < 64 tokens: the context


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A char-level base (3 steps) with a LoRA SFT run on it, and a 400-token BPE base (3 steps)."""
  from tests.conftest import TINY_SHAKESPEARE
  d = tmp_path_factory.mktemp('export')
  text = TINY_SHAKESPEARE.read_text(encoding='utf-8')
  (d / 'char.txt').write_text(text[:30000], encoding='utf-8')
  (d / 'bpe.txt').write_text(text[:8000], encoding='utf-8')
  c = tiny_config(str(d / 'char.txt'), steps=3, eval_every=0, checkpoint_every=3, samples=0)
  c.model.max_seq_len = 64
  pretrain.run(c, str(d / 'char'))
  lines = [json.dumps({'instruction': f'Say {w}.', 'input': '', 'output': w})
           for w in ['ROMEO', 'JULIET', 'king', 'queen', 'lord', 'lady'] * 5]
  (d / 'inst.jsonl').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  s = sft_config(str(d / 'char'), str(d / 'inst.jsonl'), steps=2, checkpoint_every=2)
  s.peft.method = 'lora'
  s.optim.lr = 3e-2     # B starts at zero: two big steps make the LoRA update matter
  sft.run(s, str(d / 'lora'))
  b = tiny_config(str(d / 'bpe.txt'), steps=3, eval_every=0, checkpoint_every=3, samples=0)
  b.data.update(tokenizer='bpe', vocab_size=400)
  b.model.max_seq_len = 64
  pretrain.run(b, str(d / 'bpe'))
  return d


def _hf_and_ours(run_dir, out):
  export.export(str(run_dir), str(out))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  cfg, tok, params = export.load_merged(str(run_dir), sharding.make_mesh({'data': -1}))
  return hf_tok, hf_model, cfg, tok, jax.device_get(params)


def _check_same_model(hf_tok, hf_model, cfg, tok, params):
  ids = tok.encode(SAMPLE).tolist()
  assert hf_tok(SAMPLE)['input_ids'] == ids
  assert hf_tok.decode(ids) == tok.decode(ids) == SAMPLE
  with torch.no_grad():
    hf_logits = hf_model(torch.tensor([ids])).logits.numpy()
  ours, _ = model.forward(params, jnp.asarray([ids]), cfg)
  np.testing.assert_allclose(np.asarray(ours)[..., :cfg.vocab_size], hf_logits, atol=1e-4, rtol=0)
  prompt = ids[:12]
  eos = () if tok.eos_id is None else (tok.eos_id,)   # both stop at eos (the config names it)
  gen = decode.generate(params, [np.asarray(prompt)], jax.random.key(0), cfg=cfg,
                        sampling=decode.SamplingConfig(temperature=0.0, max_new_tokens=10, eos_ids=eos))
  ours_new = np.asarray(gen.tokens[0])[np.asarray(gen.mask[0]).astype(bool)].tolist()
  with torch.no_grad():
    hf_out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=10, do_sample=False)
  assert hf_out[0, len(prompt):].tolist() == ours_new and len(ours_new) >= 1


def test_lora_sft_run_exports_merged_with_its_char_tokenizer(runs, tmp_path):
  hf_tok, hf_model, cfg, tok, params = _hf_and_ours(runs / 'lora', tmp_path / 'hf')
  assert isinstance(tok, tokenizers.WithSpecialTokens) and tok.base.kind == 'char'
  # the added special tokens keep their ids
  for name, i in tok.special_ids.items():
    assert hf_tok.convert_tokens_to_ids(tokenizers.special_piece(name)) == i
  # the LoRA update is in the exported weights: they differ from the base's
  base = stage.load_run(str(runs / 'char'))
  delta = np.abs(np.asarray(params['layers']['attn']['wq']) - np.asarray(base.params['layers']['attn']['wq']))
  assert delta.max() > 1e-4
  _check_same_model(hf_tok, hf_model, cfg, tok, params)


def test_bpe_pretraining_run_exports(runs, tmp_path):
  hf_tok, hf_model, cfg, tok, params = _hf_and_ours(runs / 'bpe', tmp_path / 'hf')
  assert tok.kind == 'sentencepiece' and hf_tok.eos_token_id == tok.eos_id == 2
  odd = 'naïve café — 東京 😀 1234\t tabs  '
  assert hf_tok(odd)['input_ids'] == tok.encode(odd).tolist()   # byte fallback, digits
  assert hf_tok.decode(tok.encode(odd).tolist()) == odd
  _check_same_model(hf_tok, hf_model, cfg, tok, params)


def test_old_workdirs_keep_their_tokenizer_json(runs, tmp_path):
  """A workdir written before the rename (tokenizer.json) is still read."""
  import shutil
  old = tmp_path / 'old'
  shutil.copytree(runs / 'char', old)
  os.rename(old / tokenizers.RUN_FILE, old / 'tokenizer.json')
  assert tokenizers.run_file(str(old)).endswith('tokenizer.json')
  assert stage.read_source(str(old)).tokenizer.vocab_size == stage.read_source(str(runs / 'char')).tokenizer.vocab_size


def _copy_with_config(src, dst, edit):
  """A copy of the run `src` at `dst` whose config.json is changed by `edit(cfg)`."""
  import shutil
  shutil.copytree(src, dst)
  cfg = json.load(open(dst / 'config.json'))
  edit(cfg)
  json.dump(cfg, open(dst / 'config.json', 'w'))
  return dst


def _as_prefix_run(cfg):
  cfg['peft']['method'] = 'prefix'


def test_prefix_runs_and_bad_input_are_one_sentence(runs, tmp_path):
  prefix = _copy_with_config(runs / 'lora', tmp_path / 'prefix', _as_prefix_run)
  with pytest.raises(ConfigError, match='prefix-tuned run, which cannot be exported as a plain'):
    export.export(str(prefix), str(tmp_path / 'out'))
  with pytest.raises(ConfigError, match='holds no config.json'):
    export.export(str(tmp_path), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def test_a_lora_run_is_a_plain_source_for_the_next_stage(runs, tmp_path):
  """init_from=LORA_RUN gives the base with the adapters folded in: its logits equal the
  unmerged LoRA forward (peft.combine) on the base. A prefix run, or a base that changed since,
  is refused in one sentence."""
  from lm import checkpoint as ckpt_lib, peft, train as train_lib
  mesh = sharding.make_mesh({'data': -1})
  src = stage.read_source(str(runs / 'lora'))
  pcfg = src.peft_config()
  assert pcfg.method == 'lora' and src.base['path'] == str(runs / 'char')
  merged = jax.device_get(src.restore_params(mesh))
  base = stage.read_source(str(runs / 'char')).restore_params(mesh, src.cfg)
  abstract = jax.eval_shape(lambda k: peft.init(src.cfg, pcfg, k), jax.random.key(0))
  ck = ckpt_lib.Checkpointer(str(runs / 'lora' / 'checkpoints'), async_save=False)
  try:   # the adapters as saved, read on their own
    adapters = ck.restore_params(src.step, train_lib.abstract_with_shardings(
        abstract, jax.tree.map(lambda _: sharding.replicated(mesh), abstract)))
  finally:
    ck.close()
  ids = jnp.asarray([src.tokenizer.encode(SAMPLE).tolist()])
  want, _ = model.forward(peft.combine(base, adapters, src.cfg, pcfg), ids, src.cfg)
  got, _ = model.forward(merged, ids, src.cfg)
  base_logits, _ = model.forward(base, ids, src.cfg)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert not np.allclose(got, base_logits, atol=1e-3)       # the adapters are in it
  prefix = _copy_with_config(runs / 'lora', tmp_path / 'prefix', _as_prefix_run)
  with pytest.raises(ConfigError, match='prefix-tuned run: its extra parameters have no place'):
    stage.read_source(str(prefix)).restore_params(mesh)
  moved = _copy_with_config(runs / 'lora', tmp_path / 'moved',
                            lambda cfg: cfg['source'].update(config_hash='something else'))
  with pytest.raises(ckpt_lib.CheckpointError, match='is no longer the run'):
    stage.read_source(str(moved)).restore_params(mesh)
