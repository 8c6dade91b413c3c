"""Golden outputs of the shipped default weights (weights/llama-tiny, float32, CPU).

tests/data/golden_llama_tiny.json (written by tools/make_golden.py) holds two greedy runs from a
fixed prompt: 50 tokens through the default cache (S = 512: nothing evicted) and 100 tokens
through a 4+60 cache (evicting from step ~47 on), with the top logit and the top-2 logit margin
at every step.

A step whose margin is tiny may legitimately flip on another CPU or torch version (float32
reductions differ in order), so argmaxes are compared only where the recorded margin exceeds
THRESHOLD (1e-3 in logits; float32 noise on these logits is ~1e-5). After a flip the free-running
continuation would diverge, so every step is checked with teacher forcing (the recorded tokens
fed back), and free-running generation is compared up to the first low-margin step.

The golden was written by minillm; transformers (float32, dense, the same weights) cross-checks it
on every step that is dense attention (all of the dense run, the first 48 steps of the streaming
one), teacher-forced and with its own greedy `generate`.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import minillm
from minillm.apps.generation import generate

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "llama-tiny"
GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_llama_tiny.json").read_text(encoding="utf-8"))
THRESHOLD = GOLDEN["threshold"]
LOGIT_TOL = 1e-2  # a real change (a position, a norm, a mask) moves logits by far more


@pytest.fixture(scope="module")
def model():
    digest = hashlib.sha256((WEIGHTS / "model.safetensors").read_bytes()).hexdigest()
    assert digest == GOLDEN["weights_sha256"], "weights/llama-tiny changed: rerun tools/make_golden.py"
    m = minillm.load(WEIGHTS, dtype=torch.float32, device="cpu")
    m.eval()
    return m


def test_prompt_tokenizes_as_recorded():
    assert minillm.load_tokenizer(WEIGHTS).encode(GOLDEN["prompt"]) == GOLDEN["prompt_ids"]


def test_golden_is_well_formed():
    for name, run in GOLDEN["runs"].items():
        n = run["new_tokens"]
        assert len(run["tokens"]) == len(run["margins"]) == len(run["top_logits"]) == n, name
        # most steps must be checkable, or the golden proves little
        assert sum(m > THRESHOLD for m in run["margins"]) >= 0.9 * n, name
    streaming = GOLDEN["runs"]["streaming"]
    assert len(GOLDEN["prompt_ids"]) + streaming["new_tokens"] > streaming["cache_size"] + 20  # it evicts


@pytest.mark.parametrize("name", ["dense", "streaming"])
def test_teacher_forced_steps_match(model, name):
    run = GOLDEN["runs"][name]
    prompt = GOLDEN["prompt_ids"]
    cache = model.new_cache(batch_size=1, sinks=run["sinks"], window=run["cache_size"] - run["sinks"])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + run["tokens"][:-1]]), cache=cache)[0, len(prompt) - 1:].double()
    top = logits.max(-1)
    checked = 0
    for step, (token, margin, top_logit) in enumerate(zip(run["tokens"], run["margins"], run["top_logits"])):
        assert abs(top.values[step].item() - top_logit) < LOGIT_TOL, f"{name} step {step}: top logit moved"
        if margin > THRESHOLD:
            assert top.indices[step].item() == token, f"{name} step {step}: argmax changed (recorded margin {margin})"
            checked += 1
    assert checked >= 0.9 * len(run["tokens"])


@pytest.mark.parametrize("name", ["dense", "streaming"])
def test_free_running_generation_matches(model, name):
    """minillm.generate itself (prefill + one-token decode steps) reproduces the recorded tokens up
    to the first step whose margin is too small to be sure of."""
    run = GOLDEN["runs"][name]
    low = [i for i, m in enumerate(run["margins"]) if m <= THRESHOLD]
    upto = low[0] + 1 if low else len(run["tokens"])  # that step itself may flip; later ones then diverge
    got = list(generate(model, GOLDEN["prompt_ids"], max_new_tokens=upto, temperature=0, sinks=run["sinks"],
                        window=run["cache_size"] - run["sinks"], ignore_eos=True))
    want = run["tokens"][:upto]
    if low:  # compare up to (not including) the uncertain step
        got, want = got[: low[0]], want[: low[0]]
    assert got == want


# --- an independent oracle: transformers on the same weights -------------------------------
# The golden was recorded by minillm itself; transformers' Llama, run densely in float32 on the
# same checkpoint, checks it. The dense run fits its cache, so all of it is dense attention; the
# streaming run is dense too until its stream reaches the cache size (S = 64), and only those
# steps are compared.


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    m = transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS, dtype=torch.float32)
    return m.eval()


def _dense_steps(run) -> int:
    """How many of a run's steps are predicted by a query at stream position < S (nothing evicted)."""
    return min(run["new_tokens"], run["cache_size"] - len(GOLDEN["prompt_ids"]) + 1)


@pytest.mark.parametrize("name", ["dense", "streaming"])
def test_golden_matches_transformers_teacher_forced(hf_model, name):
    run = GOLDEN["runs"][name]
    prompt, steps = GOLDEN["prompt_ids"], _dense_steps(run)
    assert steps >= 40  # enough of the run is checked
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + run["tokens"][: steps - 1]])).logits[0, len(prompt) - 1:].double()
    top = logits.max(-1)
    for step in range(steps):
        assert abs(top.values[step].item() - run["top_logits"][step]) < LOGIT_TOL, f"{name} step {step}"
        if run["margins"][step] > THRESHOLD:
            assert top.indices[step].item() == run["tokens"][step], f"{name} step {step}: transformers disagrees"


def test_golden_matches_transformers_generate(hf_model):
    """transformers' own greedy generate gives the dense golden's tokens, up to the first step
    whose margin is too small to be sure of."""
    run = GOLDEN["runs"]["dense"]
    low = [i for i, m in enumerate(run["margins"]) if m <= THRESHOLD]
    upto = low[0] if low else run["new_tokens"]
    prompt = torch.tensor([GOLDEN["prompt_ids"]])
    with torch.no_grad():
        out = hf_model.generate(prompt, max_new_tokens=upto, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[0, prompt.shape[1]:].tolist() == run["tokens"][:upto]
