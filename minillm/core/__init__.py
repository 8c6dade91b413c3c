"""The engine as a reader meets it: StreamingLLM written once, in plain PyTorch.

Read in this order (docs/streaming.md walks through it):
1. `contract.py`  which keys token t attends to, in which slot each lives, at which position;
2. `positions.py` RoPE and ALiBi as functions of those positions;
3. `cache.py`     the fixed-shape sink + window cache: buffers, per-row counts, one write form;
4. `attention.py` one attention for every call: explicit scores under the contract's key sets;
5. `model.py`     the decoder of all four families; `forward` = validate, plan, blocks, head.

Nothing here knows about compilers, devices or kernels: `minillm/fast/` makes the same
computation faster, and the tests hold every fast path equal to this one.
"""

from .cache import RowState, SinkCache
from .contract import KeyPositions, key_positions, slot_of, slot_positions
from .model import Model

__all__ = ["Model", "SinkCache", "RowState", "KeyPositions", "key_positions", "slot_of", "slot_positions"]
