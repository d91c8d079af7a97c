"""Adafactor's factored path: params of >= 2 dims keep row and column means of g² (state of
another shape than the param) and run in stages (codegen.staged_plan). The generic tests
cover its vector path with every other rule; these cover matrices: torch conformance,
float32 against the float64 reference, parallel against serial, memory, checkpoints, the
drop-in class, non-finite grads, loss scaling and clipping."""
import copy

import numpy as np
import pytest

import hwoptim
from hwoptim import backends, codegen, threads
from hwoptim.backends import numba as nb
from hwoptim.rules import RULES

torch = pytest.importorskip("torch")

RULE = RULES["Adafactor"]
HOST = [b for b in ("numpy", "numba") if b in backends.available()]
SHAPES = [(7, 5), (3, 4, 33), (1, 9), (70, 1), (40,), (), (2, 1, 3, 6)]
OPTIONS = [{}, {"weight_decay": 1e-2, "maximize": True, "d": 2.0},
           {"eps": (1e-20, 1e-2), "beta2_decay": -0.5, "lr": 0.3}]


def _ids(opts):
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "default"


def _pair(rng, shapes, dtype=np.float64):
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return ps, [torch.tensor(p.copy()) for p in ps]


@pytest.fixture
def default_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("opts", OPTIONS, ids=_ids)
def test_matches_torch_in_float64(backend, opts, rng, default_float64):
    """60 steps on matrices, a batch of matrices, degenerate ones, a vector and a 0-d
    param: params and every state buffer within 1e-10 of torch.optim.Adafactor, with the
    same buffers of the same shapes."""
    ps, tps = _pair(rng, SHAPES)
    opt = hwoptim.Adafactor(ps, backend=backend, **opts)
    topt = torch.optim.Adafactor(tps, **opts)
    for _ in range(60):
        gs = [rng.standard_normal(s) for s in SHAPES]
        for tp, g in zip(tps, gs):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(gs)
    for i, (p, tp) in enumerate(zip(ps, tps)):
        ref = tp.numpy()
        assert np.abs(p - ref).max() <= 1e-10 * np.abs(ref).max(), i
        tst = topt.state[tp]
        assert set(opt.state[i]) == set(tst) - {"step"}, (i, set(opt.state[i]))
        for k, v in opt.state[i].items():
            assert v.shape == tuple(tst[k].shape), (i, k)
            assert np.abs(v - tst[k].numpy()).max() <= 1e-10 * np.abs(tst[k].numpy()).max()


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_step_near_the_float64_reference(backend, dtype, rng):
    """Each float32/float64 step against the NumPy float64 step from the same (rounded)
    state: params within 32u of |p| + |Δp|, row and column factors within 32u of
    themselves."""
    shapes = [(30, 20), (2, 17, 9), (1, 50)]
    u = np.finfo(dtype).eps / 2
    ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
    opt = hwoptim.Adafactor(ps, backend=backend, weight_decay=1e-2)
    for t in range(1, 8):
        before = [p.astype(np.float64) for p in ps]
        st = [{k: v.astype(np.float64) for k, v in s.items()} for s in opt.state]
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ref = hwoptim.Adafactor([b.copy() for b in before], backend="numpy", weight_decay=1e-2,
                                eps=(float(np.finfo(dtype).eps), 1e-3))
        for i, s in enumerate(st):
            for k, v in s.items():
                ref.state[i][k] = v
        ref.load_state_dict({**ref.state_dict(), "step": t - 1})
        opt.step(gs)
        refs = [p.copy() for p in ref.param_groups[0]["params"]]
        ref.step([g.astype(np.float64) for g in gs])
        refs = ref.param_groups[0]["params"]
        for i, p in enumerate(ps):
            bound = 32 * u * (np.abs(before[i]) + np.abs(refs[i] - before[i]))
            assert np.all(np.abs(p - refs[i]) <= bound), (t, i)
            for k, v in opt.state[i].items():
                r = ref.state[i][k]
                assert np.all(np.abs(v - r) <= 32 * u * np.abs(r)), (t, i, k)


@pytest.mark.skipif("numba" not in HOST, reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_serial_and_thread_counts_agree_bit_for_bit(dtype, rng, monkeypatch):
    """The element sweeps sum in fixed blocks of rows, so the parallel kernels, the serial
    ones, any thread count, and params stepped alone or together (``run_list``: one
    parallel loop over params, each on the serial kernels) give the same bits."""
    shapes = [(300, 257), (3, 40, 300)]
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(4)]

    def run(serial: bool, n_threads: int, alone: bool = True):
        ps = [p.copy() for p in init]
        opt = hwoptim.Adafactor(ps, backend="numba", weight_decay=1e-2)
        monkeypatch.setattr(nb, "STAGED_SERIAL_BELOW", 1 << 40 if serial else 1 << 15)
        monkeypatch.setattr(nb, "STAGED_ALONE", 0 if alone else 1 << 40)
        before = threads.get_num_threads()
        threads.set_num_threads(n_threads)
        try:
            for gs in grads:
                opt.step(gs)
        finally:
            threads.set_num_threads(before)
        return ps, opt.state

    base_p, base_s = run(False, threads.get_num_threads())
    for serial, n, alone in ((True, 1, True), (False, 1, True), (False, 2, False),
                             (False, 1, False)):
        ps, st = run(serial, n, alone)
        for a, b in zip(ps, base_p):
            assert np.array_equal(a, b)
        for sa, sb in zip(st, base_s):
            for k in sa:
                assert np.array_equal(sa[k], sb[k])


def test_state_of_a_matrix_is_m_plus_n_numbers(rng):
    """Measured from the arrays: m + n numbers for an m×n matrix (B(m + n) for a batch of
    B), against 2mn for Adam."""
    for shape, want in (((1000, 300), 1300), ((4, 50, 60), 440), ((4096,), 4096)):
        p = rng.standard_normal(shape).astype(np.float32)
        opt = hwoptim.Adafactor(p)
        assert sum(v.size for v in opt.state[0].values()) == want, shape
        assert sum(v.nbytes for v in opt.state[0].values()) == 4 * want


@pytest.mark.parametrize("backend", HOST)
def test_resume_from_a_state_dict_is_bit_identical(backend, rng):
    shapes = [(12, 7), (3, 5, 4), (9,)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(8)]
    a = [p.copy() for p in init]
    whole = hwoptim.Adafactor(a, backend=backend, lr=0.05)
    for gs in grads:
        whole.step(gs)
    b = [p.copy() for p in init]
    first = hwoptim.Adafactor(b, backend=backend, lr=0.05)
    for gs in grads[:4]:
        first.step(gs)
    sd = first.state_dict()
    c = [p.copy() for p in b]
    second = hwoptim.Adafactor(c, backend=backend)
    second.load_state_dict(sd)
    assert second.state[0]["row_var"].shape == (12, 1)
    for gs in grads[4:]:
        second.step(gs)
    for x, y in zip(a, c):
        assert np.array_equal(x, y)
    bad = {**sd, "state": [{**sd["state"][0], "row_var": np.zeros((1, 7))}, *sd["state"][1:]]}
    with pytest.raises(ValueError, match=r"state'\]\[0\]\['row_var'\] is float64 \(1, 7\); "
                                         r"expected float64 \(12, 1\)"):
        second.load_state_dict(bad)


def test_the_dropin_class_trains_as_torch(default_float64):
    """hwoptim.torch.Adafactor on an MLP (weights factored, biases not) against
    torch.optim.Adafactor: within 1e-10 after 50 steps; the state_dict loads into torch's
    class, which then steps as hwoptim's does."""
    from hwoptim.torch import Adafactor

    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(),  # noqa: E731
                                       torch.nn.Linear(30, 3))
    m1 = make()
    m2 = make()
    m2.load_state_dict(m1.state_dict())
    o1 = Adafactor(m1.parameters(), weight_decay=1e-2)
    o2 = torch.optim.Adafactor(m2.parameters(), weight_decay=1e-2)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.step()

    for _ in range(50):
        step(m1, o1)
        step(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    assert tuple(o1.state[m1[0].weight]["row_var"].shape) == (30, 1)
    o3 = torch.optim.Adafactor(m2.parameters(), weight_decay=1e-2)
    m2.load_state_dict(m1.state_dict())
    o3.load_state_dict(copy.deepcopy(o1.state_dict()))   # (a state_dict holds references)
    for _ in range(3):
        step(m1, o1)
        step(m2, o3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()


@pytest.mark.parametrize("backend", HOST)
def test_non_finite_grads_spread_as_in_torch(backend, rng, default_float64):
    """A NaN or an infinity in a grad: the elements that become non-finite, and the
    finite values elsewhere, are torch's. In a vector only that element goes (torch's
    maxima with Python's max keep a NaN RMS from spreading to the whole array); in a matrix
    the mean of the row factor carries it to every element, in torch as here."""
    shapes = [(6, 8), (7,)]
    for bad in (np.nan, np.inf):
        ps, tps = _pair(rng, shapes)
        opt = hwoptim.Adafactor(ps, backend=backend)
        topt = torch.optim.Adafactor(tps)
        for t in range(3):
            gs = [rng.standard_normal(s) for s in shapes]
            if t == 1:
                gs[0][2, 3] = gs[1][4] = bad
            for tp, g in zip(tps, gs):
                tp.grad = torch.tensor(g)
            topt.step()
            opt.step(gs)
        for p, tp in zip(ps, tps):
            ref = tp.numpy()
            assert np.array_equal(np.isfinite(p), np.isfinite(ref))
            ok = np.isfinite(ref)
            assert np.allclose(p[ok], ref[ok], rtol=1e-12, atol=0)
        assert np.isfinite(ps[1]).sum() == 6


@pytest.mark.parametrize("backend", HOST)
def test_loss_scaling_skips_and_clipping(backend, rng):
    """On matrices: a power-of-two grad_scale gives the unscaled step's bits, found_inf
    skips everything, max_grad_norm equals clipping the grads first."""
    shapes = [(10, 6), (4,)]
    init = [rng.standard_normal(s) for s in shapes]
    gs = [rng.standard_normal(s) for s in shapes]
    a, b = [p.copy() for p in init], [p.copy() for p in init]
    plain = hwoptim.Adafactor(a, backend=backend)
    scaled = hwoptim.Adafactor(b, backend=backend)
    plain.step(gs)
    scaled.step([g * 1024 for g in gs], grad_scale=1024.0)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    snap = [p.copy() for p in b], [{k: v.copy() for k, v in s.items()} for s in scaled.state]
    scaled.step(gs, found_inf=1.0)
    assert scaled.step_count == 1 and scaled.last_step_skipped
    for x, y in zip(b, snap[0]):
        assert np.array_equal(x, y)
    for s, t in zip(scaled.state, snap[1]):
        for k in s:
            assert np.array_equal(s[k], t[k])
    c, d = [p.copy() for p in init], [p.copy() for p in init]
    clipped = hwoptim.Adafactor(c, backend=backend, max_grad_norm=0.5)
    by_hand = hwoptim.Adafactor(d, backend=backend)
    total = np.sqrt(sum(float(np.sum(g * g)) for g in gs))
    clipped.step(gs)
    by_hand.step([g * (0.5 / total) for g in gs])
    for x, y in zip(c, d):
        assert np.allclose(x, y, rtol=1e-13, atol=0)


@pytest.mark.parametrize("backend", HOST)
def test_factored_16_bit_params_in_a_group_added_later(backend):
    """bfloat16 matrices with stochastic rounding (the staged kernels in a storage format;
    tests/test_formats.py holds each format to the float32 step): a group added after
    construction steps as the same params given at construction, bit for bit; the factors
    keep their shapes, in float32."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    shapes = [(8,), (9, 12), (2, 3, 40)]
    ps = [rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes]
    gs = [[rng.standard_normal(s).astype(ml_dtypes.bfloat16) for s in shapes]
          for _ in range(3)]
    a, b = [p.copy() for p in ps], [p.copy() for p in ps]
    later = hwoptim.Adafactor(a[:1], backend=backend, stochastic_rounding=True, seed=4)
    later.add_param_group({"params": a[1:]})
    given = hwoptim.Adafactor(b, backend=backend, stochastic_rounding=True, seed=4)
    for g in gs:
        later.step(g)
        given.step(g)
    for x, y, p in zip(a, b, ps):
        assert np.array_equal(x.view(np.uint16), y.view(np.uint16))
        assert not np.array_equal(x.view(np.uint16), p.view(np.uint16))
    st = later.state[2]
    assert st["row_var"].shape == (2, 3, 1) and st["col_var"].shape == (2, 1, 40)
    assert st["row_var"].dtype == np.float32
    assert np.array_equal(st["col_var"], given.state[2]["col_var"])


@pytest.mark.parametrize("fmt", [{}, {"dtype": "bfloat16", "master_weights": True},
                                 {"dtype": "bfloat16", "state_dtype": "int8",
                                  "min_8bit_size": 0}], ids=str)
@pytest.mark.parametrize("backend", HOST)
def test_empty_matrices_change_nothing(backend, fmt):
    """A matrix with no elements: nothing to update, nothing written (torch fills the
    column factor of a (0, n) param with NaN, from a mean over no rows); in a storage
    format too, beside a matrix that steps."""
    fmt = dict(fmt)
    dt = np.float64
    if fmt.pop("dtype", None):
        dt = pytest.importorskip("ml_dtypes").bfloat16
    ps = [np.zeros((0, 5), dt), np.zeros((3, 0), dt), np.ones((2, 2), dt)]
    opt = hwoptim.Adafactor(ps, backend=backend, **fmt)
    opt.step([np.zeros((0, 5), dt), np.zeros((3, 0), dt), np.full((2, 2), 0.5, dt)])
    if "state_dtype" not in fmt:
        assert np.all(opt.state[0]["col_var"] == 0) and np.all(opt.state[1]["row_var"] == 0)
    assert np.all(ps[2].astype(np.float64) < 1) and opt.step_count == 1


def test_the_staged_plan_of_a_matrix():
    """The factored plan's stages: row and column means of g² and RMS(p) in one sweep of
    the elements, the mean of the row factor over the rows, RMS(u) in a second element
    sweep; then the element, row and column stores. The vector plan is the usual two
    passes (one reduction, one update)."""
    h = {n: hy.default for n, hy in RULE.hypers.items()}
    flags = RULE.static_flags(h, RULE.options)
    vec = codegen.plan(RULE, flags)
    assert vec.stages is None and vec.norm_kinds == ("rms", "rms")
    mat = codegen.plan(RULE, RULE.array_flags(flags, (4, 5)))
    sweeps = [(lv, "".join(sorted(dom)), len(js)) for lv, dom, js in mat.stages.sweeps()]
    assert sweeps == [(1, "bcr", 3), (2, "br", 1), (3, "bcr", 1)]
    assert mat.outputs == ("param", "row_var", "col_var")
    assert RULE.array_flags(flags, (5,)) is flags and RULE.array_flags(flags, ()) is flags


@pytest.mark.parametrize("backend", HOST)
def test_eps1_none_is_the_dtype_epsilon(backend, rng):
    """torch's default eps=(None, 1e-3): ε₁ is the params' dtype's machine epsilon. Grads
    of about 1e-9 (g² below float32's ε² but far above float64's) step a float32 matrix
    and vector as torch's float32 Adafactor does, and unlike ε₁ = float64's epsilon."""
    shapes = [(8, 6), (10,)]
    ps = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tps = [torch.tensor(p.copy()) for p in ps]
    other = [p.copy() for p in ps]
    opt = hwoptim.Adafactor(ps, backend=backend)
    topt = torch.optim.Adafactor(tps)
    f64 = hwoptim.Adafactor(other, backend=backend, eps=(float(np.finfo(np.float64).eps), 1e-3))
    for _ in range(3):
        gs = [(1e-9 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
        for tp, g in zip(tps, gs):
            tp.grad = torch.tensor(g)
        topt.step()
        opt.step(gs)
        f64.step(gs)
    for p, tp, q in zip(ps, tps, other):
        ref = tp.numpy()
        assert np.allclose(p, ref, rtol=1e-5, atol=0)
        assert not np.allclose(q, ref, rtol=1e-3, atol=0)


def test_flat_params_views_are_factored_the_flat_vector_is_not(rng):
    """Adafactor sees the shapes it is given: FlatParams' views keep row and column
    factors (and step as the same arrays would), the one flat vector a full variance."""
    fp = hwoptim.FlatParams([(30, 20), (20,)])
    for v in fp.views:
        v[...] = rng.standard_normal(v.shape)
    alone = [v.copy() for v in fp.views]
    by_view = hwoptim.Adafactor(fp.views)
    plain = hwoptim.Adafactor(alone)
    assert [sorted(s) for s in by_view.state] == [["col_var", "row_var"], ["variance"]]
    gs = [rng.standard_normal(v.shape).astype(v.dtype) for v in fp.views]
    by_view.step(gs)
    plain.step(gs)
    for v, a in zip(fp.views, alone):
        assert np.array_equal(v, a)
    flat = hwoptim.Adafactor(fp.params)
    assert sorted(flat.state[0]) == ["variance"] and flat.state[0]["variance"].size == 620


@pytest.mark.skipif("numba" not in HOST, reason="numba not installed")
def test_two_python_threads_step_their_own_optimizers(rng):
    """Two threads stepping Adafactor on matrices at once (a neighbour's program): each
    gets the bits it gets alone (whatever the threading layer: under workqueue, a launch
    that finds another running takes the serial kernels)."""
    import threading

    shapes = [(300, 200), (2, 60, 70), (1500, 700)]
    inits = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(2)]
    grads = [[[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
             for _ in range(2)]

    def run(k, out):
        ps = [p.copy() for p in inits[k]]
        opt = hwoptim.Adafactor(ps, backend="numba")
        for gs in grads[k]:
            opt.step(gs)
        out[k] = ps

    alone, together = {}, {}
    for k in range(2):
        run(k, alone)
    ts = [threading.Thread(target=run, args=(k, together)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(2):
        for a, b in zip(alone[k], together[k]):
            assert np.array_equal(a, b)


def test_device_hyperparameters_resolve_eps1_none():
    """The hyperparameter vector capturable steps read on the device resolves eps1=None as
    the host does (the params' machine epsilon), never NaN."""
    for dtype in (np.float32, np.float64):
        opt = hwoptim.Adafactor([np.ones(5, dtype)], backend="numpy")
        v = opt._hyper_vector(opt.param_groups[0])
        assert not np.isnan(v).any() and np.finfo(dtype).eps in v, v
