#!/usr/bin/env bash
# Run HERE after tools/gpu_train.sh: assemble weights/<name>/ from the files that came back.
#     bash tools/gpu_unpack.sh RETURNED_DIR [DEST=weights]
# RETURNED_DIR holds <name>.safetensors per model and logs.tar.gz. Each DEST/<name>/ gets
# config.json, model.safetensors, the tokenizer files and train_log.json; the stdout logs go to
# runs/gpu_logs/. Every model is then loaded with minillm (weights + tokenizer) and greedily
# continues a prompt, and the SHA-256 of each weight file is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: gpu_unpack.sh RETURNED_DIR [DEST]}
DEST=${2:-weights}
PY=${PYTHON:-$(command -v python || command -v python3)}
[ -f "$SRC/logs.tar.gz" ] || { echo "gpu_unpack.sh: no logs.tar.gz in $SRC" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$SRC/logs.tar.gz" -C "$tmp"
mkdir -p runs/gpu_logs "$DEST"
names=()
for f in "$SRC"/*.safetensors; do
    [ -e "$f" ] || { echo "gpu_unpack.sh: no .safetensors files in $SRC" >&2; exit 2; }
    name=$(basename "$f" .safetensors)
    [ -f "$tmp/$name/config.json" ] || { echo "gpu_unpack.sh: logs.tar.gz has no $name/config.json" >&2; exit 2; }
    rm -rf "${DEST:?}/$name"
    mkdir -p "$DEST/$name"
    for g in config.json train_log.json generation_config.json tokenizer_config.json tokenizer.json tokenizer.model; do
        [ -f "$tmp/$name/$g" ] && cp "$tmp/$name/$g" "$DEST/$name/"
    done
    cp "$f" "$DEST/$name/model.safetensors"
    [ -f "$tmp/$name.log" ] && cp "$tmp/$name.log" runs/gpu_logs/
    names+=("$name")
done

PYTHONPATH=. "$PY" - "$DEST" "${names[@]}" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
import torch
import minillm

torch.set_num_threads(1)
dest = Path(sys.argv[1])
for name in sys.argv[2:]:
    d = dest / name
    model, tok = minillm.load(d), minillm.load_tokenizer(d)
    log = json.loads((d / "train_log.json").read_text())
    ids = tok.encode("It was a dark and stormy night, and")
    if model.config.sink_token_id is not None:
        ids = [model.config.sink_token_id] + ids
    with torch.no_grad():
        for _ in range(24):  # greedy, dense: just a sanity look at the text
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    size = (d / "model.safetensors").stat().st_size
    print(f"{name}: {log['parameters']:,} params, {size / 2**20:.2f} MiB, {log['tokens_seen']:,} tokens "
          f"({log['epochs']} epochs), train loss {log['final_train_loss']:.3f}, held-out "
          f"{log['final_heldout_loss']:.3f}; exported {log['exported']}\n  sha256 {digest}\n"
          f"  {tok.decode(ids)!r}")
PYEOF
