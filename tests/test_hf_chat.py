"""Hugging Face folders as stage sources: the streamed restore, EOS ids from generation_config.json,
special tokens as tokenizer_config.json declares them (transformers' AutoTokenizer is the
reference), chat templates in both directions, and a LoRA run on an `hf:` base that exports and
chains. Every folder is built here (random weights, a tokenizer trained on a few KB): offline."""
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs the [hf] extra (torch, transformers)')
transformers = pytest.importorskip('transformers', reason='needs the [hf] extra (torch, transformers)')

from data import formats, tokenizers  # noqa: E402
from experiments.stages import stage  # noqa: E402
from lm import convert, sharding  # noqa: E402

# ChatML as Qwen2.5 writes it (system turn optional), ending turns in <|im_end|>.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ['<|begin|>', '<|eot|>', '<|pad|>', '<|im_start|>', '<|im_end|>']
CHAT = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Who speaks first?'},
        {'role': 'assistant', 'content': 'The first citizen.'}, {'role': 'user', 'content': 'And then?'},
        {'role': 'assistant', 'content': 'All, speaking together.'}]


def _text():
  from tests.conftest import TINY_SHAKESPEARE
  return TINY_SHAKESPEARE.read_text(encoding='utf-8')[:20000]


def hf_folder(path, chat_template=CHATML, family='qwen2'):
  """A tiny random Qwen2 (or LLaMA) folder whose tokenizer ends text in '<|eot|>' (not one of the
  conventional spellings), with a generation_config.json that also ends turns at <|im_end|>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator([_text()], trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<|begin|>', eos_token='<|eot|>',
                                              pad_token='<|pad|>', chat_template=chat_template)
  fast.save_pretrained(path)
  meta = json.loads((path / 'tokenizer_config.json').read_text())   # as released folders declare it:
  meta.update(unk_token=None, tokenizer_class={'qwen2': 'Qwen2Tokenizer', 'llama': 'LlamaTokenizer'}[family])
  (path / 'tokenizer_config.json').write_text(json.dumps(meta))      # no unk (byte-level BPE needs none)
  eot, im_end = tk.token_to_id('<|eot|>'), tk.token_to_id('<|im_end|>')
  sizes = dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eot)
  cfg = transformers.Qwen2Config(**sizes) if family == 'qwen2' else transformers.LlamaConfig(**sizes)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path, safe_serialization=True)
  transformers.GenerationConfig(eos_token_id=[eot, im_end]).save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return hf_folder(tmp_path_factory.mktemp('qwen') / 'hf')


@pytest.mark.parametrize('family', ['qwen2', 'llama'])
def test_hf_source_streams_onto_the_mesh_with_generation_config_eos(family, folder, tmp_path):
  path = folder if family == 'qwen2' else hf_folder(tmp_path / 'hf', family='llama')
  source = stage.read_source(f'hf:{path}')
  eot, im_end = (source.tokenizer.tk.token_to_id(p) for p in ('<|eot|>', '<|im_end|>'))
  assert source.cfg.eos_ids == (eot, im_end)   # config.json's, then generation_config.json's
  mesh = sharding.make_mesh({'fsdp': 4, 'tensor': 2})
  got = source.restore_params(mesh)
  want, _ = convert.import_hf(str(path))   # the host-side import: the reference
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
  from lm import model
  target = sharding.tree_shardings(model.logical_axes(source.cfg), abstract, mesh)
  for (p, w), g, t in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                          jax.tree.leaves(target, is_leaf=lambda x: hasattr(x, 'spec'))):
    np.testing.assert_array_equal(np.asarray(g), w, err_msg=str(p))
    assert g.sharding.is_equivalent_to(t, g.ndim), p


def test_special_tokens_are_the_declared_ones(folder, tmp_path):
  """'<|eot|>' is this model's eos (tokenizer_config.json says so): its own id, no new token,
  and every id equals AutoTokenizer's, through a run's saved pointer too."""
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  tok = stage.read_source(f'hf:{folder}').tokenizer
  assert tok.special_ids == {'bos': auto.bos_token_id, 'eos': auto.eos_token_id, 'pad': auto.pad_token_id}
  assert tok.eos_id == auto.convert_tokens_to_ids('<|eot|>') and tok.vocab_size == len(auto)
  assert tokenizers.add_special_tokens(tok, ['eos']) is tok   # nothing added, nothing random
  tok.save(str(tmp_path / 'tokenizer_ref.json'))
  again = tokenizers.load(str(tmp_path / 'tokenizer_ref.json'))
  assert again.special_ids == tok.special_ids and again.chat_template == CHATML
  for text in [_text()[:3000], 'naïve café — ok<|eot|>', ' \n\t x']:
    want = auto.encode(text, add_special_tokens=False)
    assert tok.encode(text).tolist() == want and again.encode(text).tolist() == want


def test_class_default_tokens_the_file_lacks_are_refused(folder, tmp_path):
  """A Qwen2Tokenizer that declares no unk_token gets transformers' default '<|endoftext|>' as a
  new id: refused in one sentence rather than trained as a new random token."""
  import shutil
  shutil.copytree(folder, tmp_path / 'f')
  meta = json.loads((tmp_path / 'f' / 'tokenizer_config.json').read_text())
  del meta['unk_token']
  (tmp_path / 'f' / 'tokenizer_config.json').write_text(json.dumps(meta))
  with pytest.raises(tokenizers.TokenizerError, match='endoftext.*unk_token'):
    tokenizers.load_hf_folder(str(tmp_path / 'f'))


def test_gpt2_declares_one_token_for_bos_eos_and_unk(tmp_path):
  """GPT-2's tokenizer_config.json makes '<|endoftext|>' its bos, eos and unk: all three are
  kept (a guessed spelling list found it only as eos, and the export lost its bos_token)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator([_text()], trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.GPT2TokenizerFast(tokenizer_object=tk, bos_token='<|endoftext|>', eos_token='<|endoftext|>',
                                 unk_token='<|endoftext|>').save_pretrained(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  tok = tokenizers.load_hf_folder(str(tmp_path))
  assert tok.special_ids == {'bos': 0, 'eos': 0, 'unk': 0}
  tokenizers.export_hf(tok, str(tmp_path / 'out'))
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  assert (auto.bos_token, auto.eos_token) == ('<|endoftext|>', '<|endoftext|>')


def test_a_bare_tokenizer_json_keeps_the_conventional_spellings(folder, tmp_path):
  """Without tokenizer_config.json nothing is declared: the spelling list is all there is."""
  import shutil
  shutil.copy(folder / 'tokenizer.json', tmp_path / 'tokenizer.json')
  tok = tokenizers.load_hf_folder(str(tmp_path))
  assert tok.chat_template is None and 'eos' not in tok.special_ids   # '<|eot|>' is not guessed


# Chat templates ---------------------------------------------------------------------------------
def _apply(auto, messages, **kw):
  out = auto.apply_chat_template(messages, tokenize=True, **kw)
  return list(out['input_ids'] if hasattr(out, 'keys') else out)


def test_a_folders_chat_template_formats_sft_and_prompts(folder):
  """data.template=chat on a tokenizer that carries a chat_template: the ids are
  apply_chat_template's, the loss mask covers exactly the assistant turns (content and their
  <|im_end|>\\n), and a prompt ends in the generation prompt."""
  from experiments.stages import sft_data
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  tok = stage.read_source(f'hf:{folder}').tokenizer
  assert tokenizers.add_special_tokens(tok, sft_data.needed_tokens(formats.TEMPLATES['chat'], tok)) is tok
  ex = formats.render({'messages': CHAT}, 'chat', tok)
  assert ex.tokens.tolist() == _apply(auto, CHAT)
  learned = auto.decode(ex.tokens[ex.loss_mask > 0])
  assert learned == 'The first citizen.<|im_end|>\nAll, speaking together.<|im_end|>\n'
  prompt = formats.prompt_tokens({'messages': CHAT[:4]}, 'chat', tok)
  assert prompt.tolist() == _apply(auto, CHAT[:4], add_generation_prompt=True)
  # instruction examples are one user turn
  inst = formats.render({'instruction': 'Name a king.', 'output': 'Lear.'}, 'chat', tok)
  assert inst.tokens.tolist() == _apply(auto, [{'role': 'user', 'content': 'Name a king.'},
                                               {'role': 'assistant', 'content': 'Lear.'}])
  # other templates keep their own format on the same tokenizer
  assert formats.render({'messages': CHAT[1:3]}, 'alpaca', tok).tokens.tolist() != _apply(auto, CHAT[1:3])


def test_policy_prompts_use_an_hf_folders_chat_template(folder):
  from experiments.stages import policy
  pol = policy.open_policy(f'hf:{folder}')
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  got = policy.encode_prompts(pol, ['Speak the speech, I pray you'], 64)
  assert got[0].tolist() == _apply(auto, [{'role': 'user', 'content': 'Speak the speech, I pray you'}],
                                   add_generation_prompt=True)


@pytest.fixture(scope='module')
def spm(tmp_path_factory):
  d = tmp_path_factory.mktemp('spm')
  return tokenizers.build_tokenizer('bpe', [_text()], 400, str(d / 'bpe'))


@pytest.mark.parametrize('name', ['chat', 'alpaca', 'none'])
def test_our_template_exports_as_a_chat_template(name, spm, tmp_path):
  """Our template, written as the exported folder's chat_template: AutoTokenizer's
  apply_chat_template gives the ids the run trained on, generation prompt included."""
  from experiments import export
  t = formats.get_template(name)
  tok = tokenizers.add_special_tokens(spm, t.special_names())
  src = stage.Source('run', str(tmp_path), None, tok, __import__('ml_collections').ConfigDict(
      {'data': {'template': name}}), 1, '')
  template, end = export.chat_format(src, tok)
  assert end == (tok.special_ids[t.end],)
  tokenizers.export_hf(tok, str(tmp_path / 'hf'), template)
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  assert json.loads((tmp_path / 'hf' / 'tokenizer_config.json').read_text())['chat_template'] == template
  chats = [CHAT] if t.is_chat else [CHAT[:3], CHAT[1:3]]   # text templates: one (system +) user turn
  for chat in chats:
    assert _apply(auto, chat) == formats.render({'messages': chat}, name, tok).tokens.tolist()
    want = formats.prompt_tokens({'messages': chat[:-1]}, name, tok).tolist()
    assert _apply(auto, chat[:-1], add_generation_prompt=True) == want


# A LoRA run on an hf: base --------------------------------------------------------------------
def test_a_lora_sft_run_on_an_hf_base_exports_and_chains(folder, tmp_path):
  """LoRA SFT from hf:FOLDER with the folder's chat template: the run is a source for the next
  stage (its base read back as hf:, adapters merged) and exports to a folder transformers loads
  with the same logits, the same chat template and generation_config's end-of-turn EOS."""
  import jax.numpy as jnp
  from experiments import export, sft
  from lm import model
  from tests.test_sft import sft_config
  rows = [json.dumps({'messages': [{'role': 'user', 'content': f'Say {w}.'}, {'role': 'assistant', 'content': w}]})
          for w in ['ROMEO', 'JULIET', 'king', 'queen', 'lord', 'lady'] * 5]
  (tmp_path / 'chat.jsonl').write_text('\n'.join(rows) + '\n', encoding='utf-8')
  c = sft_config(f'hf:{folder}', str(tmp_path / 'chat.jsonl'), steps=2, checkpoint_every=2)
  c.data.update(template='chat', seq_len=64)
  c.peft.method = 'lora'
  c.optim.lr = 3e-2   # B starts at zero: two big steps make the LoRA update matter
  sft.run(c, str(tmp_path / 'lora'))
  src = stage.read_source(str(tmp_path / 'lora'))
  assert src.base['kind'] == 'hf' and src.peft_config().method == 'lora'
  mesh = sharding.make_mesh({'data': -1})
  merged = jax.device_get(src.restore_params(mesh))     # what a later stage's init_from gives
  base, _ = convert.import_hf(str(folder))
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base))) > 1e-4
  export.export(str(tmp_path / 'lora'), str(tmp_path / 'out'))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').eval()
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  ids = _apply(auto, CHAT)
  assert ids == formats.render({'messages': CHAT}, 'chat', src.tokenizer).tokens.tolist()
  with torch.no_grad():
    want = hf(input_ids=torch.tensor([ids])).logits.numpy()[0]
  got, _ = model.forward(merged, jnp.asarray([ids]), src.cfg)
  np.testing.assert_allclose(np.asarray(got)[0, :, :want.shape[-1]], want, atol=1e-4)
  eos = transformers.GenerationConfig.from_pretrained(tmp_path / 'out').eos_token_id
  assert auto.convert_tokens_to_ids('<|im_end|>') in eos and auto.eos_token == '<|eot|>'
  assert auto.model_max_length == src.cfg.max_seq_len == 128   # the model's context, not 1e30
  again = stage.read_source(f'hf:{tmp_path / "out"}')          # and the export is itself a source
  assert again.tokenizer.special_ids == src.tokenizer.special_ids and again.cfg.eos_ids == tuple(eos)
  assert again.tokenizer.chat_template == CHATML


@pytest.mark.slow   # two stages, the second through the launcher in a subprocess (~1-3 min)
def test_a_reward_model_and_grpo_from_an_hf_folder(folder, tmp_path):
  """The online stages from hf:FOLDER: a reward model trained on the folder's model (same
  tokenizer, eos as the folder declares it), then one GRPO iteration through the launcher."""
  import os
  import subprocess
  import sys
  from experiments import reward
  from tests.test_reward import hh, rm_config
  words = ['ROMEO', 'JULIET', 'king', 'queen', 'lord', 'lady']
  pairs = [json.dumps({'chosen': hh(f'tell of {a}', f'{b} kind'), 'rejected': hh(f'tell of {a}', b)})
           for a in words for b in words if a != b]
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(pairs) + '\n', encoding='utf-8')
  c = rm_config(f'hf:{folder}', str(tmp_path / 'pairs.jsonl'), steps=2, checkpoint_every=2)
  c.data.seq_len = 64
  reward.run(c, str(tmp_path / 'rm'))
  wd = tmp_path / 'grpo'
  args = [sys.executable, '-m', 'experiments.run', '--config=experiments/configs/rlhf_grpo.py',
          f'--workdir={wd}', f'--config.init_from=hf:{folder}', f'--config.reward_from={tmp_path / "rm"}',
          '--config.rollout.samples=2', '--config.rollout.prompts=4', '--config.rollout.max_new_tokens=4',
          '--config.prompts.n_train=8', '--config.prompts.n_eval=4', '--config.train.iterations=1',
          '--config.train.epochs=1', '--config.train.minibatches=1', '--config.eval.before=False',
          '--config.eval.batch_size=8']
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  assert [x['step'] for x in rows] == [1] and np.isfinite(rows[0]['loss'])
  results = json.loads((wd / 'results.json').read_text())
  assert results['stage'] == 'grpo' and results['after']['iteration'] == 1
  assert stage.read_source(str(wd)).tokenizer.vocab_size == stage.read_source(f'hf:{folder}').tokenizer.vocab_size
