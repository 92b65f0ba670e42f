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


def test_a_bare_tokenizer_json_keeps_the_conventional_spellings(folder, tmp_path):
  """Without tokenizer_config.json nothing is declared: the spelling list is all there is."""
  import shutil
  shutil.copy(folder / 'tokenizer.json', tmp_path / 'tokenizer.json')
  tok = tokenizers.load_hf_folder(str(tmp_path))
  assert tok.chat_template is None and 'eos' not in tok.special_ids   # '<|eot|>' is not guessed
