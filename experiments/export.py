"""Export a finished run as a Hugging Face GPT-2 or LLaMA folder: weights and tokenizer.

  python -m experiments.run --config=experiments/configs/export.py --workdir=/tmp/export \\
    --config.init_from=/tmp/sft --config.out=/tmp/hf_model

init_from is a pretraining, SFT, PPO or GRPO/RLOO workdir. A full run's params are exported as
they are (PPO's policy without its value model); a LoRA run's checkpoints hold only the
adapters, so its base (config.json 'source') is restored and the adapters are folded in
(peft.merge). The folder then loads offline with
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`, and the
tokenizer gives the same ids as the run's own (data.tokenizers.export_hf). A run trained with a
template (SFT's data.template) exports it as the tokenizer's chat_template, so
`apply_chat_template` gives the ids the run trained on, and generation_config.json's
eos_token_id leads with the token that ends a response (<|end|> for the chat template).
"""
from __future__ import annotations

import dataclasses

import jax
from ml_collections import ConfigDict

from data import formats, tokenizers
from experiments.stages import stage
from lm import convert, sharding
from lm.config import ConfigError


def _check_exportable(cfg) -> None:
  """Refuse, before loading any weights, a model the GPT-2 / LLaMA-family layouts cannot hold."""
  convert.config_to_hf(cfg)  # GPT-2, or a LLaMA-family config that round-trips, else a ConfigError
  if cfg.positions != 'learned':   # config_to_hf has checked every field against what transformers reads back
    return
  # fields whose non-default values change the network in ways GPT-2 does not have
  want = {'arch': 'decoder', 'causal': True, 'moe_experts': 0, 'norm_position': 'pre',
          'embed_norm': False, 'scale_embeddings': False, 'parallel_block': False,
          'scale_attention': True, 'qk_norm': False, 'norm_unit_offset': False, 'sliding_window': 0,
          'attn_softcap': 0.0, 'final_softcap': 0.0, 'query_pre_attn_scalar': 0.0}
  # GPT-2's biases are written as zeros where ours has none
  want.update(tie_embeddings=True, n_kv_heads=cfg.n_heads, d_head=cfg.d_model // cfg.n_heads)
  bad = {k: getattr(cfg, k) for k, v in want.items()
         if getattr(cfg, k) != v and not (k in ('n_kv_heads', 'd_head') and getattr(cfg, k) == 0)}
  if bad:
    raise ConfigError(f'This model cannot be exported as a plain GPT-2: '
                      f'{", ".join(f"{k}={v!r}" for k, v in bad.items())} has no counterpart there.')


def load_merged(init_from: str, mesh):
  """(ModelConfig, tokenizer, plain params) of a run; LoRA adapters folded into their base."""
  source = stage.read_source(init_from)   # this run's model, tokenizer and latest step
  pcfg = source.peft_config()
  if pcfg.method not in ('none', 'lora'):
    raise ConfigError(f'init_from={init_from} is a {pcfg.method}-tuned run, which cannot be exported '
                      'as a plain GPT-2/LLaMA (its extra parameters have no place there); tune with '
                      'peft.method=lora or none to export.')
  _check_exportable(source.cfg)
  return source.cfg, source.tokenizer, source.restore_params(mesh)   # LoRA: merged into its base


def chat_format(source: stage.Source, tok) -> tuple[str | None, tuple]:
  """(chat_template, end-of-turn ids) of a run trained with a template (its data.template): our
  template written as Jinja (formats.chat_template_jinja) and the token that ends its responses,
  or a Hugging Face folder's own chat_template where the run used that (its EOS ids are already
  the model's). (None, ()) for a run without a template (pretraining)."""
  name = source.config.get('data', {}).get('template') if source.config is not None else None
  if not name:
    return None, ()
  template = formats.get_template(name)
  if formats.uses_chat_template(template, tok):
    return tok.chat_template, ()
  hf = tokenizers.to_hf(tok)
  spell = {n: hf.id_to_token(i) for n, i in tok.special_ids.items()}
  return formats.chat_template_jinja(template, tok, spell), (tok.special_ids[template.end],)


def export(init_from: str, out: str, mesh_cfg: dict | None = None) -> str:
  """Write init_from's model and tokenizer to `out` in Hugging Face format; returns `out`."""
  mesh = sharding.make_mesh(mesh_cfg or {'data': -1})
  source = stage.read_source(init_from)
  cfg, tok, params = load_merged(init_from, mesh)
  tokenizers.check_vocab(tok, cfg.vocab_size)
  chat_template, end = chat_format(source, tok)
  # generation_config.json: generate() stops where a turn ends (<|end|> for the chat template)
  gen_cfg = dataclasses.replace(cfg, eos_ids=tuple(dict.fromkeys([*end, *cfg.eos_ids])))
  convert.export_hf(jax.device_get(params), gen_cfg, out, special_ids=tok.special_ids)
  tokenizers.export_hf(tok, out, chat_template, model_max_length=cfg.max_seq_len)
  return out


def run(config: ConfigDict, workdir: str):
  if not config.init_from:
    raise ConfigError('export needs --config.init_from=DIR (a pretraining or SFT workdir).')
  out = config.out or workdir
  if config.init_from.startswith('hf:'):
    raise ConfigError('init_from is already a Hugging Face folder; there is nothing to export.')
  export(config.init_from, out, config.mesh.to_dict())
  print(f'exported {config.init_from} to {out} (Hugging Face config.json, safetensors, tokenizer)')
  return out
