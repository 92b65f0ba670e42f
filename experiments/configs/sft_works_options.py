"""The second SFT stage of the works recipe: copying a listed option, single- and multi-word.

Three commands: the two of sft_works.py (pretrain the character-level base into runs/works_char,
tune it into runs/sft_works), then this, which continues from runs/sft_works:

python -m experiments.run --config=experiments/configs/sft_works_options.py --workdir=runs/sft_options

Why a second stage: the first teaches spelling (copy a word letter by letter) and speaker names,
but its answers to option questions are invented names, never a listed option, so the held-out
`play` family (answer: one of four listed titles) stays at 0.000. Here the stream is mostly the
two option-copying families: cloze_options (one listed word fills the blank) and phrase_options
(one of four listed title-cased 2-4-word phrases occurs in the line; multi-word, like a title).
Writing any listed title exactly is worth 0.25 on `play`; which one is right needs knowing the
play.

Not reproduced: issue 25's fresh-clone run of the three commands (quiet 2 cores) gave `play`
0.000 exact match after both stages (0/40; rank classification 0.175 -> 0.325, chance 0.25),
spelling 0.000 -> 0.975 -> 1.000, seen families 0.139 -> 0.193. The table below is from an
earlier session's machine and commit and is kept as a record, not as an expected figure.

Measured from the 800-step sft_works run (2 shared CPU cores: 1500 steps 26 min, eval 3 min;
exact match of greedy answers on held-out plays, 40 examples per family, eval.json; the `play`
rows on 200 examples (greedy answers dumped per example): 'option' = the answer is a listed option):

                          before     after
val_loss (responses)       2.262     1.933
acc play (held out)        0.000     0.075
  200 examples             0.000     0.050   (option 0.000 -> 0.260)
acc phrase_options         0.000     0.150
acc cloze_options          0.000     0.275
acc speaker                0.000     0.025
acc spelling               0.850     0.900
acc seen families          0.121     0.193
acc held-out family        0.000     0.075
(cloze, continue, previous 0.000 before and after; the pretrained base: play 0.000 on 200.)

The held-out gain is the answer format: a quarter of the play answers are a listed title
written out whole, and which one is near chance (10 of 52 right). Longer chains of
continuations (sft_works.py's docstring, sft7-9) reach 0.10-0.15 on 200 play examples.
"""
from experiments.configs import sft_works


def get_config():
  c = sft_works.get_config()
  c.init_from = 'runs/sft_works'
  w = c.data.mixture.weights
  for family in list(w):
    w[family] = 0.0
  w.update(phrase_options=8.0, cloze_options=3.0, speaker=2.0, spelling=1.0)
  w['continue'] = 0.25   # a Python keyword: on the command line, --config.data.mixture.weights['continue']=X
  c.train.update(steps=1500, checkpoint_every=250)
  c.eval.every = 500
  c.optim.update(lr=2e-3, min_lr=2e-4, warmup_steps=20)
  return c
