"""Instruction and chat examples -> tokens with loss masks -> packed or padded rows.

An example is a dict, one of
  instruction  {'instruction', 'input' (may be absent or ''), 'output'}   (Alpaca, FLAN)
  chat         {'messages': [{'role': 'system' | 'user' | 'assistant', 'content'}, ...]}
  text         {'text'}: pretraining text mixed into instruction tuning (OPT-IML); all of it
               is learned, whatever `train_on` says
and may carry a loss 'weight' (default 1) that scales all of its tokens in the loss.

Templates are data (`TEMPLATES`, chosen by name from config):
  alpaca  Alpaca's prompt ("Below is an instruction ... ### Response:\\n"), the output, eos
  chat    per turn: <|role|> content <|end|>, the markers being special ids; on a tokenizer that
          carries a chat_template (a Hugging Face folder's) that template renders the chat instead,
          with the ids of transformers' apply_chat_template (`chat_template_tokens`)
  none    instruction, input and output concatenated raw, then eos

`chat_template_jinja` writes a template of ours as a Jinja chat_template, which export puts
in the Hugging Face folder so apply_chat_template formats exactly as the run trained.

`render` gives TokenizedExample(tokens, loss_mask). loss_mask is 1 on what the model must
learn to say: the output and the token that ends it (eos; in chats every assistant turn's
content and its <|end|>), 0 on the prompt (system, user, role markers); train_on='all' makes
it all ones. Rows (`pack`: several examples per row, first fit; `pad`: one per row) carry the
batch keys of data/pipeline.py, so lm.objectives.next_token_loss trains on them unchanged:

  inputs, targets  int32    an example's tokens and next tokens, shifted within the example
  weights          float32  target's loss_mask x the example's weight; 0 at each example's
                            last token (its target would be the next example) and on padding
  segment_ids      int32    1, 2, ... per example in a row, 0 on padding: no attention across
  positions        int32    restart at 0 for every example
"""
from __future__ import annotations

import dataclasses
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

TRAIN_ON = ('response', 'all')
TRUNCATE = ('prompt_left', 'right')
ROLES = ('system', 'user', 'assistant')


class FormatError(ValueError):
  """An example or template that cannot be rendered; the message says how to fix it."""


class Dropped(Exception):
  """One example that cannot be used (counted under `reason`, never dropped silently)."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class Template:
  """How an example becomes text and special tokens.

  Text templates (`roles` None) format `prompt` (or `prompt_no_input` when the example's
  input is empty) over the example's fields, then append the output and the `end` token.
  Chat templates wrap each turn as <roles[role]> content <end>, all special tokens."""
  name: str
  prompt: str = ''
  prompt_no_input: str | None = None
  roles: Mapping[str, str] | None = None   # chat: role -> special token name
  end: str = 'eos'                         # special token name that ends a response

  @property
  def is_chat(self) -> bool:
    return self.roles is not None

  def special_names(self) -> list[str]:
    return [*(self.roles or {}).values(), self.end]


ALPACA_PROMPT = ('Below is an instruction that describes a task, paired with an input that provides '
                 'further context. Write a response that appropriately completes the request.\n\n'
                 '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
ALPACA_NO_INPUT = ('Below is an instruction that describes a task. Write a response that '
                   'appropriately completes the request.\n\n'
                   '### Instruction:\n{instruction}\n\n### Response:\n')

TEMPLATES = {
    'alpaca': Template('alpaca', ALPACA_PROMPT, ALPACA_NO_INPUT),
    'chat': Template('chat', roles={r: r for r in ROLES}, end='end'),
    'none': Template('none', '{instruction}{input}', '{instruction}'),
}


def get_template(template: str | Template) -> Template:
  if isinstance(template, Template):
    return template
  if template not in TEMPLATES:
    raise FormatError(f'Unknown template {template!r}; choose one of {sorted(TEMPLATES)}.')
  return TEMPLATES[template]


@dataclasses.dataclass
class TokenizedExample:
  tokens: np.ndarray      # int32 [n]
  loss_mask: np.ndarray   # float32 [n]: 1 where the token is learned (as the previous one's target)
  weight: float = 1.0     # the example's loss weight

  def __len__(self):
    return len(self.tokens)


# Examples -> pieces (text or special-token name, in the loss?) -------------------------------
def _fields(fmt: str) -> list[str]:
  return [f for _, f, _, _ in string.Formatter().parse(fmt) if f]


def _need(example: Mapping, name: str, template: str, what: str = 'a string') -> str:
  value = example.get(name)
  if not isinstance(value, str):
    has = sorted(example)
    raise FormatError(f'Template {template!r} needs {what} field {name!r} but the example has '
                      f'{"only " + str(has) if name not in example else name + "=" + repr(value)[:40]}; '
                      'fix the data or choose a template that fits it.')
  return value


def as_messages(example: Mapping, template: str = 'chat') -> list[dict]:
  """A chat's messages, or an instruction example as one user turn and one assistant turn."""
  if 'messages' in example:
    msgs = example['messages']
    if not isinstance(msgs, list) or not msgs:
      raise FormatError('A chat example needs a non-empty list of messages.')
    for m in msgs:
      if not isinstance(m, Mapping) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
        raise FormatError(f'Every chat message needs a role in {ROLES} and a string content; got {m!r:.80}.')
    return [dict(m) for m in msgs]
  instruction = _need(example, 'instruction', template)
  inp = example.get('input') or ''
  user = instruction + ('\n\n' + inp if inp else '')
  return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': _need(example, 'output', template)}]


def _as_instruction(example: Mapping, template: Template) -> Mapping:
  """A text template renders instruction examples; a single-turn chat is read as one."""
  if 'messages' not in example:
    return example
  msgs = as_messages(example)
  system = [m['content'] for m in msgs if m['role'] == 'system']
  rest = [m for m in msgs if m['role'] != 'system']
  if [m['role'] for m in rest] != ['user', 'assistant'] or msgs[-1]['role'] != 'assistant':
    raise FormatError(f'Template {template.name!r} renders one instruction and one response; this '
                      'chat has several turns: use the chat template.')
  return {'instruction': '\n\n'.join(system + [rest[0]['content']]), 'input': '',
          'output': rest[1]['content']}


def _is_text(example: Mapping) -> bool:
  return 'text' in example and 'messages' not in example and 'output' not in example


def pieces(example: Mapping, template: str | Template) -> list[tuple[str, str, bool]]:
  """The rendering as ('text' | 'special', text or token name, in the loss) pieces."""
  t = get_template(template)
  if not isinstance(example, Mapping):
    raise FormatError(f'An example is a dict (instruction, chat or text), got {type(example).__name__}.')
  if _is_text(example):
    return [('text', _need(example, 'text', t.name), True), ('special', t.end, True)]
  if t.is_chat:
    out = []
    for m in as_messages(example, t.name):
      if m['role'] not in t.roles:
        raise FormatError(f'Template {t.name!r} has no marker for the role {m["role"]!r}; add it to its roles.')
      learn = m['role'] == 'assistant'
      out += [('special', t.roles[m['role']], False), ('text', m['content'], learn),
              ('special', t.end, learn)]
    return out
  ex = _as_instruction(example, t)
  has_input = bool(ex.get('input')) or t.prompt_no_input is None
  fmt = t.prompt if has_input else t.prompt_no_input
  values = {f: _need(ex, f, t.name) for f in _fields(fmt)}
  output = _need(ex, 'output', t.name)
  return [('text', fmt.format(**values), False), ('text', output, True), ('special', t.end, True)]


def uses_chat_template(template: str | Template, tokenizer) -> bool:
  """Whether a chat template is rendered by the tokenizer's own chat_template (a Hugging Face
  folder's): the model's conversation format wins over our role markers."""
  return get_template(template).is_chat and bool(getattr(tokenizer, 'chat_template', None))


def chat_template_jinja(template: str | Template, tokenizer, spell: Mapping[str, str]) -> str:
  """A Jinja chat_template rendering conversations as `template` does over `tokenizer`, its
  special tokens spelled `spell[name]` (as its Hugging Face export spells them); the generation
  prompt is what precedes a response. Text templates read a chat as `_as_instruction` does:
  system and user turns joined by a blank line, then the response."""
  import json
  t = get_template(template)
  check_tokenizer(t, tokenizer)
  special_piece = lambda name: spell[name]
  lit = lambda text: '{{ ' + json.dumps(text) + ' }}'   # a JSON string is a Jinja string literal
  if t.is_chat:
    turns = ''.join(f"{{% {'if' if i == 0 else 'elif'} m['role'] == {json.dumps(r)} %}}{lit(special_piece(n))}"
                    for i, (r, n) in enumerate(t.roles.items()))
    return ("{% for m in messages %}" + turns + "{% endif %}{{ m['content'] }}" + lit(special_piece(t.end)) +
            "{% endfor %}{% if add_generation_prompt %}" + lit(special_piece(t.roles['assistant']))
            + "{% endif %}")
  fmt = t.prompt_no_input if t.prompt_no_input is not None else t.prompt
  if _fields(fmt) != ['instruction']:
    raise FormatError(f'Template {t.name!r} prompts with fields {_fields(fmt)}; only an instruction-only '
                      'prompt can be written as a chat_template.')
  head, tail = fmt.split('{instruction}')
  return ("{% set ns = namespace(parts=[]) %}{% for m in messages %}{% if m['role'] != 'assistant' %}"
          "{% set ns.parts = ns.parts + [m['content']] %}{% else %}" + lit(head) + "{{ ns.parts | join('\n\n') }}"
          + lit(tail) + "{{ m['content'] }}" + lit(special_piece(t.end)) + "{% set ns.parts = [] %}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}" + lit(head) + "{{ ns.parts | join('\n\n') }}" + lit(tail)
          + "{% endif %}")


def check_tokenizer(template: str | Template, tokenizer) -> None:
  """FormatError unless the tokenizer has every special token the template uses."""
  t = get_template(template)
  if uses_chat_template(t, tokenizer):
    t = dataclasses.replace(t, roles={}, end='eos')   # its chat_template spells the turns; text ends in eos
  missing = [n for n in t.special_names() if n not in tokenizer.special_ids]
  if missing:
    raise FormatError(f'Template {t.name!r} needs special tokens {missing} that the tokenizer lacks; '
                      f'use data.tokenizers.add_special_tokens(tokenizer, {t.special_names()}) (and a '
                      'model vocabulary that covers them).')


def validate(example: Mapping, template: str | Template, tokenizer) -> None:
  """Start-up check on a first example: the template's fields exist, the tokenizer has its
  special tokens. Raises FormatError with one sentence."""
  check_tokenizer(template, tokenizer)
  pieces(example, template)
  _weight(example)


def _weight(example: Mapping) -> float:
  weight = example.get('weight', 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
    raise FormatError(f'An example weight must be a finite number >= 0, got {weight!r}.')
  return float(weight)


# Pieces -> tokens, masks, truncation ------------------------------------------------------
def _truncate(tokens: np.ndarray, learn: np.ndarray, max_len: int, how: str) -> tuple[np.ndarray, np.ndarray]:
  """Cut to max_len. 'prompt_left' drops the start of the prompt (everything before the
  first learned token) but keeps its last token, as the first token of a row is never
  predicted; what still does not fit is cut on the right. 'right' cuts on the right."""
  excess = len(tokens) - max_len
  if excess <= 0:
    return tokens, learn
  left = 0
  if how == 'prompt_left':
    first = int(np.argmax(learn)) if learn.any() else len(learn)
    left = min(excess, max(first - 1, 0))
  keep = slice(left, left + max_len)
  return tokens[keep], learn[keep]


def _encode(ps: Sequence[tuple[str, str, bool]], template, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Pieces -> (tokens, learned?) arrays; text is encoded piece by piece so the mask is exact."""
  ids = tokenizer.special_ids
  if any(k == 'special' and v not in ids for k, v, _ in ps):
    check_tokenizer(template, tokenizer)
  toks = [np.array([ids[v]], np.int32) if k == 'special' else np.asarray(tokenizer.encode(v), np.int32)
          for k, v, _ in ps]
  learn = [np.full(len(t), in_loss) for t, (_, _, in_loss) in zip(toks, ps)]
  if not toks:
    return np.zeros(0, np.int32), np.zeros(0, bool)
  return np.concatenate(toks), np.concatenate(learn)


def chat_template_tokens(messages: list[dict], tokenizer, add_generation_prompt: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, learned?) of a chat rendered by the tokenizer's chat_template: the ids of transformers'
  apply_chat_template, learned where they fall in an assistant turn (its content and whatever the
  template closes it with), located as the text each turn adds to the conversation before it."""
  text = tokenizer.render_chat(messages, add_generation_prompt)
  ids, offsets = tokenizer.encode_chat(text)
  learn = np.zeros(len(ids), bool)
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    before = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
    through = tokenizer.render_chat(messages[:i + 1])
    if not (through.startswith(before) and text.startswith(through)):
      raise FormatError(f'The chat_template does not render assistant turn {i} as an extension of the '
                        'conversation before it, so its loss mask cannot be placed; use '
                        'data.template=alpaca or none.')
    learn |= (offsets[:, 0] >= len(before)) & (offsets[:, 0] < len(through))
  return ids, learn


def _render(example, template, tokenizer, train_on, max_len, truncate) -> tuple[TokenizedExample, bool]:
  if train_on not in TRAIN_ON:
    raise FormatError(f'train_on={train_on!r} is not supported; choose one of {TRAIN_ON}.')
  if truncate not in TRUNCATE:
    raise FormatError(f'truncate={truncate!r} is not supported; choose one of {TRUNCATE}.')
  if not uses_chat_template(template, tokenizer):
    tokens, learn = _encode(pieces(example, template), template, tokenizer)
  elif _is_text(example):
    text_t = dataclasses.replace(get_template(template), roles=None, end='eos')
    tokens, learn = _encode(pieces(example, text_t), text_t, tokenizer)
  else:
    tokens, learn = chat_template_tokens(as_messages(example, get_template(template).name), tokenizer)
  cut = max_len is not None and len(tokens) > max_len
  if cut:
    tokens, learn = _truncate(tokens, learn, max_len, truncate)
  if not learn[1:].any():   # the first token of a row is never predicted
    raise Dropped('empty_response')
  if train_on == 'all' or _is_text(example):
    learn = np.ones(len(tokens), bool)
  return TokenizedExample(tokens, learn.astype(np.float32), _weight(example)), cut


def render(example: Mapping, template: str | Template, tokenizer, train_on: str = 'response',
           max_len: int | None = None, truncate: str = 'prompt_left') -> TokenizedExample:
  """One example as tokens and loss mask (see the module docstring).

  Raises FormatError for an example the template cannot render, and Dropped('empty_response')
  when truncation to max_len leaves no learned token that is predicted (index >= 1)."""
  return _render(example, template, tokenizer, train_on, max_len, truncate)[0]


def prompt_tokens(example: Mapping, template: str | Template, tokenizer) -> np.ndarray:
  """The tokens a model is given to generate the (last) response: everything before it.

  The example's final output may be absent (evaluation)."""
  ex = dict(example)
  if uses_chat_template(template, tokenizer):
    msgs = as_messages({**ex, 'output': ex.get('output', '')}, get_template(template).name)
    if msgs[-1]['role'] == 'assistant':
      msgs = msgs[:-1]
    return chat_template_tokens(msgs, tokenizer, add_generation_prompt=True)[0]
  if 'messages' in ex:
    if ex['messages'] and ex['messages'][-1].get('role') != 'assistant':
      ex['messages'] = list(ex['messages']) + [{'role': 'assistant', 'content': ''}]
  else:
    ex.setdefault('output', '')
  ps = pieces(ex, template)
  last = max(i for i, p in enumerate(ps) if p[2] and p[0] == 'text')  # the final response text
  return _encode(ps[:last], template, tokenizer)[0]


def render_examples(examples: Iterable[Mapping], template: str | Template, tokenizer,
                    train_on: str = 'response', max_len: int | None = None,
                    truncate: str = 'prompt_left') -> tuple[list[TokenizedExample], dict]:
  """Render every example; returns (kept examples, report).

  The tokenizer is checked against the template before any example, and a bad first
  example fails before any other is read (FormatError at start-up). The report counts
  {'examples', 'kept', 'truncated', 'dropped': {reason: n}}: nothing is dropped silently."""
  check_tokenizer(template, tokenizer)
  out, report = [], {'examples': 0, 'kept': 0, 'truncated': 0, 'dropped': {}}
  for ex in examples:
    report['examples'] += 1
    try:
      r, cut = _render(ex, template, tokenizer, train_on, max_len, truncate)
      report['truncated'] += cut
    except Dropped as d:
      report['dropped'][d.reason] = report['dropped'].get(d.reason, 0) + 1
      continue
    out.append(r)
  report['kept'] = len(out)
  return out, report


# Rows --------------------------------------------------------------------------------------
def _rows(examples: Sequence[TokenizedExample], assignment: Sequence[list[int]], seq_len: int) -> dict:
  """Rows of examples laid out back to back: assignment[r] lists the examples of row r."""
  n_rows = len(assignment)
  batch = {'inputs': np.zeros((n_rows, seq_len), np.int32),
           'targets': np.zeros((n_rows, seq_len), np.int32),
           'weights': np.zeros((n_rows, seq_len), np.float32),
           'segment_ids': np.zeros((n_rows, seq_len), np.int32),
           'positions': np.zeros((n_rows, seq_len), np.int32)}
  for r, members in enumerate(assignment):
    o = 0
    for seg, k in enumerate(members, 1):
      ex = examples[k]
      n = len(ex)
      batch['inputs'][r, o:o + n] = ex.tokens
      batch['targets'][r, o:o + n - 1] = ex.tokens[1:]   # the last token's target stays padding
      batch['weights'][r, o:o + n - 1] = ex.loss_mask[1:] * ex.weight
      batch['segment_ids'][r, o:o + n] = seg
      batch['positions'][r, o:o + n] = np.arange(n)
      o += n
  return batch


def _check_lengths(examples: Sequence[TokenizedExample], seq_len: int) -> None:
  for k, ex in enumerate(examples):
    if len(ex) > seq_len:
      raise FormatError(f'Example {k} has {len(ex)} tokens, more than seq_len={seq_len}; render '
                        f'with max_len={seq_len} to truncate it.')
    if len(ex) == 0:
      raise FormatError(f'Example {k} has no tokens.')


def pack(examples: Sequence[TokenizedExample], seq_len: int, rows: int | None = None,
         seed: int | None = None, report: dict | None = None) -> dict[str, np.ndarray]:
  """Several examples per row of seq_len tokens, greedy first fit (in order, or in a
  permutation seeded by `seed`). With `rows`, exactly that many rows: examples that do not
  fit are counted in report['overflow'] (an error without a report)."""
  _check_lengths(examples, seq_len)
  order = range(len(examples)) if seed is None else np.random.default_rng(seed).permutation(len(examples))
  placed, overflow = first_fit([len(examples[k]) for k in order], seq_len, rows)
  assignment = [[int(order[i]) for i in row] for row in placed]
  if overflow:
    if report is None:
      raise FormatError(f'{overflow} of {len(examples)} examples do not fit in {rows} rows of '
                        f'{seq_len} tokens; pass report= to count and drop them, or give fewer examples.')
    report['overflow'] = report.get('overflow', 0) + overflow
  if report is not None:
    report['packed'] = report.get('packed', 0) + len(examples) - overflow
  return _rows(examples, assignment, seq_len)


def first_fit(lengths: Sequence[int], seq_len: int, rows: int | None = None) -> tuple[list[list[int]], int]:
  """Greedy first fit of items of these lengths, in order, into rows of seq_len: (each row's
  item indices, how many items did not fit). With rows=None a new row opens when none fits,
  so every item is placed; with `rows`, exactly that many rows and the rest overflow."""
  assignment: list[list[int]] = [[] for _ in range(rows or 0)]
  free = np.full(rows if rows is not None else len(lengths), seq_len if rows is not None else 0, np.int64)
  used, overflow = len(assignment), 0
  for k, n in enumerate(lengths):
    fits = np.flatnonzero(free[:used] >= n)
    if len(fits):
      r = int(fits[0])
    elif rows is None:
      r, used = used, used + 1
      free[r] = seq_len
      assignment.append([])
    else:
      overflow += 1
      continue
    assignment[r].append(k)
    free[r] -= n
  return assignment, overflow


def pad(examples: Sequence[TokenizedExample], seq_len: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded; the same keys and layout as `pack`."""
  _check_lengths(examples, seq_len)
  return _rows(examples, [[k] for k in range(len(examples))], seq_len)
