"""Tensor parallelism over torch.distributed: each rank holds a share of every layer's heads and MLP.

    torch.distributed.init_process_group("gloo")      # torchrun sets the rank, world size, address
    model = minillm.load(path, tensor_parallel=True)  # this rank's shard, read from its own slices

A shard is the core's `Model` (minillm/core/model.py) built from a *local* config: this rank's
query heads, KV heads and MLP width (`shard_config`). Its attention, cache and fast layer are the
core's, unchanged. The projections are split as in Megatron-LM, gpt-fast's tp.py and vLLM:
- column-parallel: the fused QKV (this rank's heads) and the MLP's input (its slice of the width);
- row-parallel: the attention output and the MLP's output projections take this rank's columns,
  so each rank holds a partial sum, and `Block.reduce` (the core's hook) all-reduces it: once per
  projection in a sequential block, once per layer after attention + MLP in a parallel-residual
  one (GPT-NeoX, Falcon). Their biases are held by rank 0 only (zeros elsewhere): added once.
- replicated: the embedding, the norms and the LM head, so every rank returns the full logits.
With fewer KV heads than ranks (Falcon-7B has one), each KV head is replicated on the W / KV ranks
whose query heads use it, as vLLM does. The sinks, window and cache-relative positions are per KV
head, so the cache needs no communication.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from ..core.config import ModelConfig
from ..core.model import Model
from ..core.positions import alibi_slopes
from ..errors import MiniLLMError


@dataclass(frozen=True)
class Shard:
    """This rank's share of a model of `config` (the whole model's) over `world` ranks."""
    config: ModelConfig  # the whole model's
    rank: int
    world: int
    heads: tuple[int, int]  # query heads [start, stop)
    kv_heads: tuple[int, int]  # KV heads [start, stop) (one, replicated, when KV < world)
    inter: tuple[int, int]  # MLP intermediate width [start, stop)
    group: object = None  # the process group (None: the default one)

    @property
    def local(self) -> ModelConfig:
        """The config of this rank's share: the core builds and runs it as a model of its own."""
        h0, h1 = self.heads
        k0, k1 = self.kv_heads
        i0, i1 = self.inter
        return self.config.replace(num_heads=h1 - h0, num_kv_heads=k1 - k0, intermediate_size=i1 - i0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast_token(self, token: int) -> int:
        """Rank 0's token, on every rank: floating-point differences can never split a stream."""
        import torch.distributed as dist

        if self.world == 1:
            return token
        t = torch.tensor([token], dtype=torch.int64, device=_collective_device(self.group))
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return int(t.item())


def _collective_device(group=None) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def plan_shard(config: ModelConfig, rank: int, world: int, group=None) -> Shard:
    """Which heads and width rank `rank` of `world` holds; a width that does not split is refused."""
    H, KV, I = config.num_heads, config.num_kv_heads, config.intermediate_size
    if H % world:
        raise MiniLLMError(f"tensor_parallel: {H} query heads do not split over {world} ranks")
    if I % world:
        raise MiniLLMError(f"tensor_parallel: the MLP's intermediate width {I} does not split over {world} ranks")
    if KV % world == 0:
        k0 = rank * (KV // world)
        kv = (k0, k0 + KV // world)
    elif world % KV == 0:  # fewer KV heads than ranks: each is replicated on world / KV ranks
        k0 = rank // (world // KV)
        kv = (k0, k0 + 1)
    else:
        raise MiniLLMError(f"tensor_parallel: {KV} KV heads do not split over {world} ranks (nor does {world} "
                           f"split into {KV} groups to replicate them)")
    per = H // world
    return Shard(config, rank, world, (rank * per, (rank + 1) * per), kv,
                 (rank * (I // world), (rank + 1) * (I // world)), group)


class ShardedModel(Model):
    """The core's model, built from this rank's local config, with the all-reduces installed."""

    def __init__(self, config: ModelConfig, shard: Shard):
        super().__init__(config)
        self.shard = shard
        for block in self.layers:
            block.reduce = shard.all_reduce

    def spec(self):
        key = (self.device, self.dtype)
        if key not in self._specs:
            spec = super().spec()
            if spec.slopes is not None:  # ALiBi: this rank's heads' slopes of the whole model's
                g = self.shard.config
                h0, h1 = self.shard.heads
                slopes = alibi_slopes(g.alibi, g.num_heads, g.alibi_bias_max)[h0:h1].to(self.device)
                spec = dataclasses.replace(spec, slopes=slopes)
            self._specs[key] = spec
        return self._specs[key]

    def new_cache(self, *args, **kwargs):
        cache = super().new_cache(*args, **kwargs)
        cache.world_size = self.shard.world
        return cache


def _runs(idx: list[int]):
    """Consecutive runs [a, b) of a list of indices, in order."""
    start = prev = None
    for i in idx:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            yield start, prev + 1
            start = prev = i
    if start is not None:
        yield start, prev + 1


class ShardTensors:
    """A checkpoint-tensor source (checkpoint.load_tensors' interface) that hands out this rank's
    slices of the whole model's tensors, reading only them (`get_rows` / `get_cols` of the source)."""

    def __init__(self, source, shard: Shard):
        from ..formats.checkpoint import name_pairs

        self.source, self.shard = source, shard
        self.declared_layers = getattr(source, "declared_layers", "the config declares")
        self.role: dict[str, tuple[str, int, tuple]] = {}  # checkpoint name -> (ours, part, all parts)
        for ours, theirs in name_pairs(shard.config).items():
            parts = theirs if isinstance(theirs, tuple) else (theirs,)
            for p, name in enumerate(parts):
                self.role[name] = (ours, p, parts)
        self._qkv_rows = None

    def names(self) -> set[str]:
        return self.source.names()

    def describe(self, name: str) -> str:
        return self.source.describe(name)

    def qkv_rows(self) -> list[int]:
        """This rank's rows of the checkpoint's fused (or concatenated) QKV, in the order that the
        local config's own layout (checkpoint.qkv_permutation) turns into the engine's [q; k; v]."""
        if self._qkv_rows is None:
            from ..formats.checkpoint import qkv_permutation

            s, g = self.shard, self.shard.config
            hd, H, KV = g.head_dim, g.num_heads, g.num_kv_heads
            (h0, h1), (k0, k1) = s.heads, s.kv_heads
            engine = torch.cat([torch.arange(h0 * hd, h1 * hd), H * hd + torch.arange(k0 * hd, k1 * hd),
                                (H + KV) * hd + torch.arange(k0 * hd, k1 * hd)])
            perm = qkv_permutation(g)
            rows = engine if perm is None else perm[engine]
            local = qkv_permutation(s.local)
            self._qkv_rows = (rows if local is None else rows[torch.argsort(local)]).tolist()
        return self._qkv_rows

    def get(self, name: str) -> torch.Tensor:
        ours, p, parts = self.role.get(name, (None, 0, (name,)))
        s, src = self.shard, self.source
        if ours is None or not ours.startswith("layers."):
            return src.get(name)  # replicated
        what = ours.split(".", 2)[2]
        if what in ("attn.wqkv.weight", "attn.wqkv.bias"):
            sizes = [src.shape(n)[0] for n in parts]
            lo = sum(sizes[:p])
            mine = [r - lo for r in self.qkv_rows() if lo <= r < lo + sizes[p]]
            return torch.cat([src.get_rows(name, a, b) for a, b in _runs(mine)], dim=0)
        if what in ("mlp.w_in.weight", "mlp.w_in.bias"):
            (i0, i1), I = s.inter, s.config.intermediate_size
            rows = src.shape(name)[0]
            if len(parts) == 1 and rows == 2 * I:  # one fused [gate; up]
                return torch.cat([src.get_rows(name, i0, i1), src.get_rows(name, I + i0, I + i1)], dim=0)
            return src.get_rows(name, i0, i1)
        if what == "attn.wo.weight":
            hd = s.config.head_dim
            return src.get_cols(name, s.heads[0] * hd, s.heads[1] * hd)
        if what == "mlp.w_out.weight":
            return src.get_cols(name, *s.inter)
        if what in ("attn.wo.bias", "mlp.w_out.bias"):  # added once: by rank 0
            if s.rank == 0:
                return src.get(name)
            return torch.zeros(src.shape(name), dtype=torch.float32)
        return src.get(name)  # norms


def checkpoint_fingerprint(config: ModelConfig, tensors) -> str:
    """A short fingerprint of what every rank reads alike: the whole model's config, every tensor's
    name and shape, and the bytes of the replicated tensors each rank loads anyway (the
    embedding, the norms, the head), so two checkpoints of one architecture differ too."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for name in sorted(tensors.names()):
        h.update(f"{name} {tuple(tensors.shape(name))}\n".encode())
    return h.hexdigest()


def replicated_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("layers.") and not ("norm" in name):
            continue
        h.update(name.encode())
        h.update(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def current_group():
    """(rank, world) of the initialised default process group, or a MiniLLMError naming the problem."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise MiniLLMError("tensor_parallel=True needs an initialised torch.distributed process group: run under "
                           "torchrun and call torch.distributed.init_process_group() first (the CLI's "
                           "--tensor-parallel does)")
    return dist.get_rank(), dist.get_world_size()


def agree(what: str, value: str) -> None:
    """Every rank's `value` must be the same; otherwise every rank raises the same error."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        odd = [r for r, v in enumerate(values) if v != values[0]]
        raise MiniLLMError(f"tensor_parallel: the ranks disagree on {what} (rank(s) {odd} differ from rank 0); "
                           f"every rank must load the same checkpoint")


def load_shard(tensors, config: ModelConfig, dtype, device):
    """This rank's shard of the checkpoint that `tensors` reads (checkpoint.load_tensors' source).

    The ranks first agree on the checkpoint (`checkpoint_fingerprint`); an error on any rank is
    raised on every rank, so none waits forever on a collective the others never reach."""
    from ..formats.checkpoint import load_tensors
    from ..formats.families import FAMILIES

    rank, world = current_group()
    LOADING.append(True)  # from here on, every rank's failure is shared by the ranks' exchanges below
    adjust = getattr(FAMILIES[config.family], "adjust_to_checkpoint", None)
    if adjust is not None:
        config = adjust(config, tensors.names())
    status = ["ok", ""]
    model = None
    try:
        shard = plan_shard(config, rank, world)
        status[1] = checkpoint_fingerprint(config, tensors)
    except MiniLLMError as e:
        status = ["error", str(e)]
    _share_status(status, rank)
    agree("the checkpoint (config and tensor shapes)", status[1])
    try:
        model = load_tensors(ShardTensors(tensors, shard), shard.local, dtype, device,
                             make=lambda local: ShardedModel(local, shard))
        status = ["ok", replicated_fingerprint(model)]
    except MiniLLMError as e:
        status = ["error", str(e)]
    _share_status(status, rank)
    agree("the checkpoint's weights", status[1])
    return model


LOADING: list = []  # non-empty once this rank's load reached load_shard (api.load clears it)


def share_failure(message: str) -> None:
    """This rank failed before load_shard (a missing file, a bad config): answer the other ranks'
    first exchange with the error, so that they raise it too instead of waiting for this rank."""
    import torch.distributed as dist

    _share_status(["error", message], dist.get_rank())


def _share_status(status, rank) -> None:
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, status)
    if status[0] == "error":  # this rank's own error first
        raise MiniLLMError(status[1])
    for r, (state, message) in enumerate(every):
        if state == "error":
            raise MiniLLMError(f"tensor_parallel: rank {r} failed: {message}")


__all__ = ["Shard", "ShardedModel", "plan_shard", "load_shard", "current_group"]
