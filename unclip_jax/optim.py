"""AdamW with the paper's per-stage hyperparameters, learning-rate schedules and
the EMA of parameters that sampling uses."""

import jax
import jax.numpy as jnp
import optax

# unCLIP paper, Table 3. Weight decay is given for the priors only.
PAPER_HPARAMS = {
    "prior": dict(learning_rate=1.1e-4, b2=0.96, eps=1e-6, weight_decay=6e-2, ema_decay=0.9999),
    "ar_prior": dict(learning_rate=1.6e-4, b2=0.91, eps=1e-10, weight_decay=4e-2, ema_decay=0.999),
    "decoder": dict(learning_rate=1.2e-4, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999),
    "sr1": dict(learning_rate=1.2e-4, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999),
    "sr2": dict(learning_rate=1.0e-4, b2=0.999, eps=1e-8, weight_decay=0.0, ema_decay=0.9999),
}


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0, decay: str = "constant",
                           total_steps: int | None = None) -> optax.Schedule:
  """Linear warmup, then constant or cosine decay to zero at total_steps."""
  if decay == "constant":
    after = optax.constant_schedule(learning_rate)
  elif decay == "cosine":
    if not total_steps or total_steps <= warmup_steps:
      raise ValueError("cosine decay needs total_steps greater than warmup_steps.")
    after = optax.cosine_decay_schedule(learning_rate, total_steps - warmup_steps)
  else:
    raise ValueError(f"Unknown learning-rate decay {decay!r}; expected 'constant' or 'cosine'.")
  if warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
  """Weight decay on matrices and kernels only, not on biases, norms or embeddings' scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          grad_clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decay masked to matrices)."""
  parts = []
  if grad_clip_norm:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def paper_adamw(stage: str, learning_rate=None, **overrides) -> optax.GradientTransformation:
  """AdamW with Table 3's settings for `stage` (prior, decoder, sr1, sr2)."""
  if stage not in PAPER_HPARAMS:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {sorted(PAPER_HPARAMS)}.")
  hp = {k: v for k, v in PAPER_HPARAMS[stage].items() if k != "ema_decay"}
  hp.update(overrides)
  lr = hp.pop("learning_rate") if learning_rate is None else learning_rate
  hp.pop("learning_rate", None)
  return adamw(lr, **hp)


def ema_decay_at(step, decay):
  """The EMA decay after `step` updates: min(decay, (1 + step) / (10 + step)).

  The warm-up keeps the random init from lingering in the EMA: with a fixed
  0.9999 a run of T steps would still hold 0.9999^T of it (90 % after 1000).
  """
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in the EMA's dtype."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema_params, params)
