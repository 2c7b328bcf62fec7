"""kernels.c against torch.bmm: the stacked step's products, on the shapes its nets and batches make."""

import pytest
import torch

from gradwatch.ensemble import kernels

# (members, output rows, inner size, batch): the seed's layers and batches, an output unit, a first layer,
# a tail of every width past the vectors, more rows than one tile, inner sizes past one transpose block
SHAPES = [(64, 10, 11, 32), (64, 10, 11, 8), (5, 1, 11, 32), (5, 10, 3, 32), (3, 13, 5, 37), (2, 9, 33, 16),
          (3, 33, 17, 1), (2, 4, 40, 23)]


def test_it_builds_here():
    """CI has a C compiler: were it to stop building, every product would silently take the slow road."""
    assert kernels.library() is not None


@pytest.mark.parametrize("road", ["c", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_products_equal_bmm(shape, road, monkeypatch):
    if road == "torch":
        monkeypatch.setattr(kernels, "library", lambda: None)
    E, O, K, B = shape  # noqa: E741
    torch.manual_seed(0)
    block = torch.randn(E, O, K + 1)  # [W | b]
    h, g = torch.randn(E, K + 1, B), torch.randn(E, O, B)
    z = torch.full((E, O, B), float("nan"))
    kernels.matmul(block, h, z)()
    torch.testing.assert_close(z, torch.bmm(block, h), rtol=1e-5, atol=1e-5)

    grad, dh = torch.full((E, O, K + 1), float("nan")), torch.full((E, K, B), float("nan"))
    kernels.backward(g, h, grad, block, dh)()
    torch.testing.assert_close(grad, torch.bmm(g, h.transpose(1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, torch.bmm(block[:, :, :K].transpose(1, 2), g), rtol=1e-5, atol=1e-5)


def test_strided_operands_and_the_fallback_agree(monkeypatch):
    """Views into larger buffers (the next layer's input, a gradient block) are read and written in place,
    nothing around them touched; without the library the same call gives the same numbers through torch."""
    torch.manual_seed(1)
    E, O, K, B = 6, 10, 11, 32  # noqa: E741
    block = torch.randn(E, O, K + 1)
    wide = torch.randn(E, K + 4, B)
    h = wide[:, 2 : K + 3]  # rows K + 1 of K + 4: member and row strides of the wider buffer
    g = torch.randn(E, O, B)
    out = torch.zeros(E, O + 3, B)
    results = []
    for lib in (kernels.library(), None):
        monkeypatch.setattr(kernels, "library", lambda lib=lib: lib)
        out.zero_()
        kernels.matmul(block, h, out[:, 1 : O + 1])()
        grads, dh = torch.zeros(E, O, K + 1), torch.zeros(E, K, B)
        kernels.backward(g, h, grads, block, dh)()
        results.append((out.clone(), grads, dh))
        assert out[:, 0].abs().sum() == 0 and out[:, O + 1 :].abs().sum() == 0
    for native, fallback in zip(*results, strict=True):
        torch.testing.assert_close(native, fallback, rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_refused_before_any_memory_is_touched():
    with pytest.raises(ValueError, match="kernels.matmul"):
        kernels.matmul(torch.randn(2, 3, 4), torch.randn(2, 5, 8), torch.empty(2, 3, 8))
    with pytest.raises(ValueError, match="kernels.backward"):
        kernels.backward(torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.empty(2, 3, 5))
    with pytest.raises(ValueError, match="kernels.matmul"):  # tanh's forward is not kernels.c's
        kernels.matmul(torch.randn(2, 3, 4), torch.randn(2, 4, 8), torch.empty(2, 3, 8), torch.empty(2, 3, 8),
                       torch.tensor([1, 2], dtype=torch.int8))
    blocks = [torch.randn(2, 3, 3), torch.randn(2, 1, 4)]
    with pytest.raises(ValueError, match="kernels.step"):  # a whole step needs both tables' code for everyone
        kernels.step(blocks, [torch.empty_like(b) for b in blocks], torch.randn(2, 2, 8), torch.rand(2, 8),
                     torch.ones(2), torch.empty(2, 1, 8), torch.tensor([1, 0], dtype=torch.int8))


def test_non_finite_values_pass_through():
    """NaN/Inf are a finding downstream (a diverged member), not something a kernel may hide."""
    block, h = torch.ones(2, 3, 4), torch.ones(2, 4, 16)
    h[0, 1, 5] = float("nan")
    h[1, 2, 7] = float("inf")
    z = torch.empty(2, 3, 16)
    kernels.matmul(block, h, z)()
    assert z[0, :, 5].isnan().all() and z[1, :, 7].isinf().all() and z.isfinite().sum() == 2 * 3 * 16 - 6


def test_a_machine_without_a_compiler_trains_through_torch(monkeypatch, tmp_path):
    """No compiler (or a broken one): one warning naming why, then the same numbers through torch.bmm."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="kernels.c not built .*no-such-cc"):
            assert kernels.library() is None
        block, h = torch.randn(3, 4, 6), torch.randn(3, 6, 16)
        z = torch.empty(3, 4, 16)
        kernels.matmul(block, h, z)()
        torch.testing.assert_close(z, torch.bmm(block, h))
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("road", ["c", "torch"])
def test_activations_and_derivatives_equal_atens_to_the_bit(road, monkeypatch):
    """A product's sigmoid or ReLU, and a backward's derivative, equal torch.sigmoid, clamp_min and aten's
    sigmoid/tanh/threshold backward bit for bit, per member's code (0: left alone), on pre-activations
    from about -300 to 300 (past exp's limits), with a tail of 5 examples, NaN and +-Inf. torch.sigmoid
    is taken on a whole number of its vectors: aten computes the last numel % 32 elements of a call
    with the C library's exp, which can differ in the last bit from its vector loop (and kernels.c)."""
    if road == "torch":
        monkeypatch.setattr(kernels, "library", lambda: None)
    E, R, C, B = 8, 10, 11, 37
    torch.manual_seed(2)
    block, h, g = torch.randn(E, R, C) * 40, torch.randn(E, C, B), torch.randn(E, R, B)
    h[1, 3, 4], block[2, 5, 0] = float("nan"), float("inf")  # a NaN column in member 1, +-Inf in member 2
    codes = torch.tensor([1, 1, 1, 3, 3, 0, 0, 1], dtype=torch.int8)
    z, a = torch.empty(E, R, B), torch.full((E, R, B), 7.0)
    kernels.matmul(block, h, z, a, codes)()
    assert z.isnan().any() and z.isinf().any() and (z.abs() > 104).any()
    for e, code in enumerate(codes.tolist()):
        vectors = torch.sigmoid(torch.nn.functional.pad(z[e].flatten(), (0, 32 - z[e].numel() % 32)))
        expected = {1: vectors[: z[e].numel()].view(R, B), 3: torch.clamp_min(z[e], 0),
                    0: torch.full_like(z[e], 7.0)}[code]
        assert torch.equal(a[e].nan_to_num(-9), expected.nan_to_num(-9)), e

    outputs = {1: torch.sigmoid, 2: torch.tanh, 3: torch.relu}
    codes = torch.tensor([1, 2, 2, 3, 3, 0, 1, 2], dtype=torch.int8)
    below = torch.randn(E, C - 1, B) * 3
    a = torch.stack([outputs.get(c, torch.relu)(below[e]) for e, c in enumerate(codes.tolist())])
    w, hk, grad = torch.randn(E, R, C), torch.randn(E, C, B), torch.empty(E, R, C)
    plain, fused = torch.empty(E, C - 1, B), torch.empty(E, C - 1, B)
    kernels.backward(g, hk, grad, w, plain)()
    kernels.backward(g, hk, grad, w, fused, a, codes)()
    derivatives = {1: torch.ops.aten.sigmoid_backward, 2: torch.ops.aten.tanh_backward,
                   3: lambda d, y: torch.ops.aten.threshold_backward(d, y, 0), 0: lambda d, y: d}
    for e, code in enumerate(codes.tolist()):
        assert torch.equal(fused[e], derivatives[code](plain[e], a[e])), e
