"""The unCLIP paper's per-stage training and sampling settings (Table 3).

Architecture-free: model configs build on these. Inspect with
  python -c "from configs import paper; print(paper.get_config('decoder'))"
Training with them arrives with train.py (issue #5):
  python train.py --config configs/paper.py:decoder --workdir /tmp/decoder
"""

import ml_collections

from unclip_jax import optim

_DIFFUSION = {
    # schedule, training steps, sampling steps, sampler, variance, prediction
    "prior": ("cosine", 1000, 64, "ddpm", "fixed_small", "x0"),
    "decoder": ("cosine", 1000, 250, "ddpm", "learned_range", "eps"),
    "sr1": ("cosine", 1000, 27, "ddim", "fixed_small", "eps"),
    "sr2": ("linear", 1000, 15, "ddim", "fixed_small", "eps"),
}
_BATCH = {"prior": 4096, "decoder": 2048, "sr1": 1024, "sr2": 512}
_ITERATIONS = {"prior": 600_000, "decoder": 800_000, "sr1": 1_000_000, "sr2": 1_000_000}


def get_config(stage: str = "decoder") -> ml_collections.ConfigDict:
  if stage not in _DIFFUSION:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {sorted(_DIFFUSION)}.")
  schedule, train_steps, sample_steps, sampler, variance, prediction = _DIFFUSION[stage]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=schedule, num_timesteps=train_steps, prediction_type=prediction, variance_type=variance))
  c.sampling = ml_collections.ConfigDict(dict(
      num_steps=sample_steps, sampler=sampler, eta=0.0, spacing="linspace"))
  hp = optim.PAPER_HPARAMS[stage]
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=hp["learning_rate"], b1=0.9, b2=hp["b2"], eps=hp["eps"],
      weight_decay=hp["weight_decay"], grad_clip_norm=1.0))
  c.ema_decay = hp["ema_decay"]
  c.batch_size = _BATCH[stage]
  c.total_steps = _ITERATIONS[stage]
  return c
