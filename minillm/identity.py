"""Which model a cache or a saved stream belongs to: a fingerprint of its config and weights.

A cache remembers the model that made it by that model's `uid` (a number per process): the check
on every forward is then one comparison. Where the numbers differ (another model object, or a
state saved by another process), the question is whether the two models compute the same thing,
so they are compared by `fingerprint(model)`: a SHA-256 over the config and every tensor of the
state dict (name, dtype, shape and bytes, in a fixed order). It is computed only when needed
(the first time two uids differ, or a state is saved) and kept with the model until a tensor
changes: each tensor's storage and version counter are part of the key it is kept under, so an
in-place update, a `load_state_dict`, `.to()` or `quantize_int8` gives a new fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref

import torch

_models: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # uid -> model, while it lives


def register(model) -> None:
    """Remember `model` under its uid (Model.__init__ calls this)."""
    _models[model.uid] = model


def _key(model) -> tuple:
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape), t.device)
                 for name, t in model.state_dict(keep_vars=True).items())


def fingerprint(model) -> str:
    """The model's fingerprint (hex SHA-256 of its config and weights); cached until a tensor changes."""
    key = _key(model)
    cached = getattr(model, "_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    config = dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else vars(model.config)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"\n{name} {str(t.dtype)} {tuple(t.shape)}\n".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    digest = h.hexdigest()
    model._fingerprint = (key, digest)
    return digest


def of_owner(owner_id) -> str | None:
    """The fingerprint of the live model with uid `owner_id`, or None if there is none."""
    model = _models.get(owner_id) if isinstance(owner_id, int) else None
    return None if model is None else fingerprint(model)


def same_model(owner_id, model) -> bool:
    """Whether the model that made a cache (uid `owner_id`) computes exactly what `model` does."""
    if owner_id == model.uid:
        return True
    other = of_owner(owner_id)
    return other is not None and other == fingerprint(model)
