"""The chunked head + softcap + cross-entropy (nanochat.loss) against the plain full-logits expression."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.loss import softcap_cross_entropy

CAP = 15.0


def plain_loss(h, w, targets, vocab, reduction):
    z = (h @ w[:vocab].to(h.dtype).t()).float()
    return F.cross_entropy(CAP * torch.tanh(z / CAP), targets, ignore_index=-1, reduction=reduction)


def make(n=300, c=32, v_pad=192, vocab=181, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v_pad, c, generator=g) * 0.5).requires_grad_()  # large enough that the softcap bends
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::5] = -1
    return h, w, t, vocab


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 64, 77, 1000])
def test_values_and_gradients_match_plain_fp32(reduction, chunk_rows):
    h, w, t, vocab = make()
    ref = plain_loss(h, w, t, vocab, reduction)
    (ref * 3).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = softcap_cross_entropy(h, w, t, vocab, CAP, reduction=reduction, chunk_rows=chunk_rows)
    (out * 3).backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # fp32 sums in another order: absolute error of a few ulp of the largest gradient (~1)
    torch.testing.assert_close(h.grad, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-5)
    assert w.grad[vocab:].abs().sum() == 0          # padded vocab rows get no gradient
    assert h.grad[::5].abs().sum() == 0              # ignored positions contribute nothing


def test_bf16_matches_plain_within_bf16_rounding():
    h, w, t, vocab = make(dtype=torch.bfloat16)
    ref = plain_loss(h, w, t, vocab, "mean")
    ref.backward()
    gh, gw = h.grad.float().clone(), w.grad.clone()
    h.grad = w.grad = None
    out = softcap_cross_entropy(h, w, t, vocab, CAP, chunk_rows=50)
    out.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad, gw, rtol=2e-2, atol=2e-3)


def test_per_token_losses_without_grad_and_refusal_with_grad():
    h, w, t, vocab = make()
    with torch.no_grad():
        ref = plain_loss(h, w, t, vocab, "none")
        out = softcap_cross_entropy(h, w, t, vocab, CAP, reduction="none", chunk_rows=64)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="forward-only"):
        softcap_cross_entropy(h, w, t, vocab, CAP, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        softcap_cross_entropy(h, w, t, vocab, CAP, reduction="avg")


def test_model_loss_and_gradients_same_with_and_without_chunking():
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    idx = torch.randint(0, 300, (3, 64))
    tgt = torch.randint(0, 300, (3, 64))
    tgt[:, :7] = -1
    grads, losses = [], []
    for chunked in (False, True):
        model.chunked_loss = chunked
        model.zero_grad(set_to_none=True)
        loss = model(idx, tgt)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        with torch.no_grad():
            per_token = model(idx, tgt, loss_reduction="none")
        assert per_token.shape == (3, 64) and (per_token[:, :7] == 0).all()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_takes_plain_path_for_per_token_gradients():
    """RL needs per-token losses with gradients: the model must fall back to the plain path, not raise."""
    model = build_model(GPTConfig(sequence_len=32, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    idx = torch.randint(0, 100, (2, 32))
    loss = model(idx, idx, loss_reduction="none")
    assert loss.shape == (2, 32) and loss.requires_grad
    loss.sum().backward()
    assert isinstance(model, GPT) and model.lm_head.weight.grad is not None


# -----------------------------------------------------------------------------
# the compiled chunk kernels (used on CPU when a chunk has >= FUSED_MIN_ELEMENTS logits; forced on here)


@pytest.fixture
def fused(monkeypatch):
    """Compiled kernels for every chunk size, and a tiny bf16 group so several weight-gradient flushes happen.
    Counts the calls so a test can prove the compiled path ran."""
    import nanochat.loss as L
    monkeypatch.setattr(L, "FUSED_MIN_ELEMENTS", 0)
    monkeypatch.setattr(L, "GROUP_BYTES", 181 * 2 * 100)  # 100 bf16 rows of vocab 181 -> groups of 2 chunks of 50
    monkeypatch.setitem(L._compiled, "cpu", None)
    monkeypatch.delitem(L._compiled, "cpu")
    kernels = L._kernels(torch.device("cpu"))
    assert kernels is not None, "NANOCHAT_FUSED_LOSS is off in this environment"
    calls = {"sumexp": 0, "pass": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper
    monkeypatch.setitem(L._compiled, "cpu", (counted("sumexp", kernels[0]), counted("pass", kernels[1])))
    return calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_kernels_match_plain_fp32(fused, reduction):
    h, w, t, vocab = make()
    ref = plain_loss(h, w, t, vocab, reduction)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = softcap_cross_entropy(h, w, t, vocab, CAP, reduction=reduction, chunk_rows=64)  # 4 chunks + a short one
    out.backward()
    assert fused == {"sumexp": 0, "pass": 4}          # the short last chunk (44 rows) ran eagerly
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, gw, rtol=1e-4, atol=1e-5)
    assert w.grad[vocab:].abs().sum() == 0 and h.grad[::5].abs().sum() == 0


def test_compiled_kernels_match_plain_bf16_with_grouped_weight_gradient(fused):
    h, w, t, vocab = make(dtype=torch.bfloat16)
    ref = plain_loss(h, w, t, vocab, "mean")
    ref.backward()
    gh, gw = h.grad.float().clone(), w.grad.clone()
    h.grad = w.grad = None
    out = softcap_cross_entropy(h, w, t, vocab, CAP, chunk_rows=50)   # 6 chunks in 3 groups of 100 rows
    out.backward()
    assert fused == {"sumexp": 0, "pass": 6}
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), gh, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad, gw, rtol=2e-2, atol=2e-3)
    assert h.grad[::5].float().abs().sum() == 0


def test_compiled_kernels_per_token_losses_without_grad(fused):
    h, w, t, vocab = make()
    with torch.no_grad():
        ref = plain_loss(h, w, t, vocab, "none")
        out = softcap_cross_entropy(h, w, t, vocab, CAP, reduction="none", chunk_rows=100)
    assert fused == {"sumexp": 3, "pass": 0}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tanh_through_exp_is_exact_to_fp32_rounding_and_saturates():
    from nanochat.loss import _tanh_cap
    z = torch.cat([torch.linspace(-50, 50, 100_001), torch.tensor([-1e30, -1e4, 1e4, 1e30, 0.0])])
    torch.testing.assert_close(_tanh_cap(z, CAP), torch.tanh(z / CAP), rtol=0, atol=3e-7)
    assert _tanh_cap(torch.tensor([1e30]), CAP).item() == 1.0


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    import nanochat.loss as L
    monkeypatch.setattr(L, "FUSED_MIN_ELEMENTS", 0)

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setitem(L._compiled, "cpu", (broken, broken))
    h, w, t, vocab = make()
    ref = plain_loss(h, w, t, vocab, "mean")
    with pytest.warns(UserWarning, match="compiled loss kernel unavailable on cpu"):
        out = softcap_cross_entropy(h.detach(), w.detach(), t, vocab, CAP, chunk_rows=64)
    assert L._compiled["cpu"] is None                 # not tried again
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_model_on_cpu_runs_the_chunked_loss_outside_the_graph(monkeypatch):
    """torch.compile(model) on CPU: the trunk is compiled, softcap_cross_entropy runs eagerly after it (a graph
    break) and gives the eager model's loss and gradients."""
    import nanochat.loss as L
    calls = []
    orig = L._SoftcapCrossEntropy.forward
    monkeypatch.setattr(L._SoftcapCrossEntropy, "forward", staticmethod(lambda *a: calls.append(1) or orig(*a)))
    torch.manual_seed(0)
    model = build_model(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    idx, tgt = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    results = []
    for m in (model, torch.compile(model, dynamic=False)):
        model.zero_grad(set_to_none=True)
        loss = m(idx, tgt)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert len(calls) == 2                            # the chunked loss ran in both, not inductor's plain path
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


SKIP_PROBE_SCRIPT = r"""
import os, sys, torch
import torch._inductor.cpu_vec_isa as isa
built = []
original = isa.VecISA.check_build
def recording(self, code):
    built.append(code == isa.VecISA._avx_code)
    return original(self, code)
isa.VecISA.check_build = recording
from nanochat.common import compute_init
compute_init("cpu")
print("env", os.environ.get("TORCHINDUCTOR_VEC_ISA_OK"))
import nanochat.loss as L
torch.manual_seed(0)
h = torch.randn(256, 64, requires_grad=True)
w = torch.randn(4096, 64, requires_grad=True)
t = torch.randint(0, 4096, (256,))
loss = L.softcap_cross_entropy(h, w, t, 4096, 15.0)
assert L._compiled["cpu"] is not None, "the compiled kernel fell back to eager"
ref = torch.nn.functional.cross_entropy(15 * torch.tanh(h @ w.t() / 15), t)
print("diff", abs(loss.item() - ref.item()))
print("generic_builds", sum(built))
"""


@pytest.mark.parametrize("preset", [None, "0"])
def test_cpu_stages_skip_inductors_vector_isa_dry_build(tmp_path, preset):
    """compute_init on CPU trusts the ISA ATen runs with (TORCHINDUCTOR_VEC_ISA_OK=1: no ~10 s of test builds
    before the first compile), the fused loss still compiles and matches, and a value the user set is kept."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_VEC_ISA_OK"}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")  # cold: nothing built before
    if preset is not None:
        env["TORCHINDUCTOR_VEC_ISA_OK"] = preset
    out = subprocess.run([sys.executable, "-c", SKIP_PROBE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.split("\n") if line)
    assert lines["env"] == (preset or "1")
    assert float(lines["diff"]) < 1e-4
    # no generic per-ISA dry build: trusted (without compute_init's default inductor would run one per ISA), or
    # vectorization turned off by the user's "0"
    assert int(lines["generic_builds"]) == 0
