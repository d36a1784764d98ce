"""MuonAdamW tests: AdamW parity with torch, Muon orthogonality, schedule fields, exact state round trip,
gradient averaging under torchrun (gloo). Run: .venv/bin/pytest tests/test_optim.py"""

import os
import subprocess
import sys
import textwrap

import pytest

import torch

from nanochat.gpt import GPTConfig, build_model
from nanochat import optim
from nanochat.optim import MuonAdamW, muon_update, polar_express


def test_adamw_group_matches_torch_adamw():
    torch.manual_seed(0)
    p0 = torch.randn(16, 8)
    ours_p = torch.nn.Parameter(p0.clone())
    ref_p = torch.nn.Parameter(p0.clone())
    ours = MuonAdamW([{"kind": "adamw", "params": [ours_p], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10,
                       "weight_decay": 0.1}])
    ref = torch.optim.AdamW([ref_p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(16, 8)
        ours_p.grad, ref_p.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(ours_p, ref_p, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ours_p, p0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_kernel_matches_the_written_out_update(dtype):
    """The eager step uses PyTorch's fused AdamW kernel; adamw_update spells the reference formula out op by op
    (and is what the compiled step runs). Same results up to rounding in the param's dtype."""
    from nanochat.optim import adamw_update, adamw_update_fused
    torch.manual_seed(0)
    p = torch.randn(64, 32).to(dtype)
    a = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    b = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    for t in range(1, 6):
        g = torch.randn(64, 32).to(dtype)
        adamw_update(a[0], g, a[1], a[2], t, 0.01 * t, 0.1, 1e-10, 0.8, 0.95)
        adamw_update_fused(b[0], g, b[1], b[2], t, 0.01 * t, 0.1, 1e-10, 0.8, 0.95)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for x, y in zip(a, b):
        torch.testing.assert_close(y.float(), x.float(), **tol)
    assert not torch.equal(b[0], p)
    # 0-d tensor hyperparameters (the compiled path's) and mixed dtypes take the written-out update
    c = [p.clone(), torch.zeros_like(p), torch.zeros_like(p)]
    g = torch.randn(64, 32).to(dtype)
    adamw_update_fused(c[0], g, c[1], c[2], torch.tensor(1.0), torch.tensor(0.01), 0.1, 1e-10, 0.8, 0.95)
    adamw_update(p, g, torch.zeros_like(p), torch.zeros_like(p), 1, 0.01, 0.1, 1e-10, 0.8, 0.95)
    torch.testing.assert_close(c[0].float(), p.float(), atol=1e-6, rtol=1e-5)


def test_polar_express_is_near_orthogonal():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        X = polar_express(torch.randn(2, *shape))
        s = torch.linalg.svdvals(X)
        assert s.max() / s.min() < 4, (shape, s)


def test_first_muon_update_is_near_semi_orthogonal():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(96, 32))
    opt = MuonAdamW([{"kind": "muon", "params": [p], "lr": 0.1, "momentum": 0.95, "beta2": 0.9, "ns_steps": 5,
                      "weight_decay": 0.0}])
    p.grad = torch.randn(96, 32)
    opt.step()
    update = -p.detach() / (0.1 * (96 / 32) ** 0.5)       # undo lr and the per-shape lr scale
    s = torch.linalg.svdvals(update)
    assert s.max() / s.min() < 4
    # Muon+ / NorMuon keep the Frobenius norm at sqrt(min(m, n))
    assert abs(update.norm().item() - 32 ** 0.5) < 1e-3


def _muon_step(P, G, weight_decay, lr=0.01):
    K, m, n = G.shape
    mom, second = torch.zeros(K, m, n), torch.zeros((K, m, 1) if m >= n else (K, 1, n))
    out = muon_update(G, P.clone(), mom, second, lr=lr, momentum=0.95, beta2=0.9, weight_decay=weight_decay,
                      ns_steps=5)
    return out, mom, second


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (6, 6)])
def test_muon_update_per_shape_lr_norm_normuon_buffer_and_cautious_decay(shape):
    torch.manual_seed(0)
    m, n = shape
    P, G = torch.randn(3, m, n), torch.randn(3, m, n)
    lr, wd = 0.01, 0.5
    lr_eff = lr * max(1.0, m / n) ** 0.5                  # tall matrices only get the boost (4.3)
    plain, mom, second = _muon_step(P, G, 0.0, lr)
    Y = (P - plain) / lr_eff
    # Muon+ then NorMuon: every matrix's update has Frobenius norm sqrt(min(m, n))
    torch.testing.assert_close(Y.norm(dim=(-2, -1)), torch.full((3,), min(m, n) ** 0.5), rtol=1e-4, atol=0)
    # momentum buffer after one step from zero: (1 - 0.95) g; NorMuon buffer: (1 - 0.9) * mean square of the
    # orthogonalized matrix along rows (tall / square) or columns (wide)
    torch.testing.assert_close(mom, 0.05 * G)
    assert second.shape == ((3, m, 1) if m >= n else (3, 1, n)) and (second > 0).all()
    # cautious weight decay: decays exactly where update and weight agree in sign, nothing elsewhere
    decayed, _, _ = _muon_step(P, G, wd, lr)
    agree = (Y * P) >= 0
    assert 0 < agree.sum() < agree.numel()
    torch.testing.assert_close(decayed[~agree], plain[~agree], rtol=0, atol=0)
    torch.testing.assert_close(decayed[agree], plain[agree] - lr_eff * wd * P[agree], rtol=1e-6, atol=1e-7)


def test_muon_eq_gives_every_row_the_same_norm(monkeypatch):
    # with the orthogonalization switched off and NorMuon held still (beta2 = 1 keeps a buffer of ones), MuonEq's
    # row equilibration is what remains visible: every row of the update has the same norm however unequal the
    # gradient rows are
    monkeypatch.setattr(optim, "polar_express", lambda X, steps=5: X)
    G = torch.randn(1, 4, 8) * torch.arange(1, 5).view(1, 4, 1)
    out = muon_update(G, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.ones(1, 1, 8), lr=0.01, momentum=0.95,
                      beta2=1.0, weight_decay=0.0, ns_steps=5)
    rows = out[0].norm(dim=-1)
    torch.testing.assert_close(rows, rows.mean().expand(4), rtol=1e-5, atol=0)


def test_polar_express_coefficients_are_the_papers():
    # arXiv 2505.16932, 5 iterations, safety 2e-2, cushion 2 (reference 4.3); first and last triples
    assert len(optim.POLAR_EXPRESS_COEFFS) == 5
    assert optim.POLAR_EXPRESS_COEFFS[0] == pytest.approx((8.156554524902461, -22.48329292557795, 15.878769915207462))
    assert optim.POLAR_EXPRESS_COEFFS[4] == pytest.approx((2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 300, (2, 32), generator=g)
        model(idx, idx.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_state_dict_round_trip_is_exact():
    cfg = GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    a = build_model(cfg, "cpu")
    opt_a = a.setup_optimizer(weight_decay=0.2)
    assert all(g["initial_lr"] == g["lr"] for g in opt_a.param_groups)
    assert {g["kind"] for g in opt_a.param_groups} == {"adamw", "muon"}
    _train(a, opt_a, 3, seed=1)
    b = build_model(cfg, "cpu")
    b.load_state_dict(a.state_dict())
    opt_b = b.setup_optimizer(weight_decay=0.2)
    opt_b.load_state_dict(opt_a.state_dict())
    _train(a, opt_a, 3, seed=2)
    _train(b, opt_b, 3, seed=2)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_grad_average_under_torchrun(tmp_path):
    """Two gloo ranks with different data end with identical params equal to a single-process run on the
    averaged gradient."""
    script = tmp_path / "dist_opt.py"
    script.write_text(textwrap.dedent("""
        import os, torch, torch.distributed as dist
        from nanochat.optim import MuonAdamW
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        torch.manual_seed(0)
        w, e = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(5, 3))
        opt = MuonAdamW([
            {"kind": "muon", "params": [w], "lr": 0.05, "momentum": 0.95, "beta2": 0.9, "ns_steps": 5, "weight_decay": 0.1},
            {"kind": "adamw", "params": [e], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}])
        w.grad = torch.full((8, 4), float(rank + 1)) * torch.arange(32.).view(8, 4)
        e.grad = torch.full((5, 3), float(rank + 1))
        opt.step()
        torch.save({"w": w.detach(), "e": e.detach()}, os.environ["OUT"] + f"/rank{rank}.pt")
        dist.destroy_process_group()
    """))
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(script)], check=True, env=env, timeout=120, capture_output=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["e"], r1["e"])
    # single process, mean gradient (1.5x)
    torch.manual_seed(0)
    w, e = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(5, 3))
    opt = MuonAdamW([
        {"kind": "muon", "params": [w], "lr": 0.05, "momentum": 0.95, "beta2": 0.9, "ns_steps": 5, "weight_decay": 0.1},
        {"kind": "adamw", "params": [e], "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.0}])
    w.grad = torch.full((8, 4), 1.5) * torch.arange(32.).view(8, 4)
    e.grad = torch.full((5, 3), 1.5)
    opt.step()
    assert torch.allclose(r0["w"], w.detach(), atol=1e-6) and torch.allclose(r0["e"], e.detach(), atol=1e-6)


@pytest.mark.slow
def test_compiled_step_matches_eager_across_changing_hyperparameters():
    """optimizer.compile = True runs the same Muon/AdamW math through torch.compile; the LR, momentum and WD
    change every step (0-d tensors: no recompile per value) and the params track the eager run closely."""
    results = []
    for comp in (False, True):
        gen = torch.Generator().manual_seed(0)
        adam = [torch.randn(40, 16, generator=gen), torch.randn(7, generator=gen)]
        muon = [torch.randn(32, 48, generator=gen) for _ in range(3)]
        opt = MuonAdamW([
            {"kind": "adamw", "params": adam, "lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1},
            {"kind": "muon", "params": muon, "lr": 0.02, "momentum": 0.9, "beta2": 0.9, "ns_steps": 5,
             "weight_decay": 0.2}])
        opt.compile = comp
        for i in range(5):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * (1 - i / 8)
                g["weight_decay"] *= 0.9
                if g["kind"] == "muon":
                    g["momentum"] = 0.85 + 0.02 * i
            for p in adam + muon:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.clone() for p in adam + muon])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
