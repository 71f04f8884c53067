import math

import pytest
import torch

from abdist.bilevel.dictionary import DICTIONARY_KINDS, build_dictionary, expand, fit_sub


def _zipf_counts(c: int, n_max: int = 1000, n_min: int = 2) -> torch.Tensor:
    """Long-tailed integer counts n_max·(n_min/n_max)^(i/(c-1)), with many ties in the tail."""
    i = torch.arange(c, dtype=torch.float64)
    return (n_max * (n_min / n_max) ** (i / max(c - 1, 1))).floor()


@pytest.mark.parametrize("kind", DICTIONARY_KINDS)
@pytest.mark.parametrize("c", [1, 2, 7, 10, 100])
@pytest.mark.numerics
def test_rows_are_convex_combinations(kind, c):
    counts = _zipf_counts(c)
    k = None if kind == "per_class" else max(1, c // 3)
    d = build_dictionary(counts, kind, k, dtype=torch.float64)
    assert d.shape[0] == c
    assert d.shape[1] == (c if kind == "per_class" else d.shape[1]) and 1 <= d.shape[1] <= c
    assert (d >= 0).all()
    # measured: exactly 1 on every `make test-portable` setting
    torch.testing.assert_close(d.sum(1), torch.ones(c, dtype=torch.float64), rtol=0, atol=1e-15)


def test_per_class_is_identity_and_rejects_other_k():
    d = build_dictionary([5, 3, 9], "per_class")
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, torch.eye(3))
    assert torch.equal(build_dictionary([5, 3, 9], "per_class", 3), d)
    with pytest.raises(ValueError, match="K = C"):
        build_dictionary([5, 3, 9], "per_class", 2)


@pytest.mark.parametrize("kind", ["buckets", "interp"])
def test_invalid_arguments_raise(kind):
    with pytest.raises(ValueError, match="1 <= K <= C"):
        build_dictionary([5, 3, 9], kind, 0)
    with pytest.raises(ValueError, match="1 <= K <= C"):
        build_dictionary([5, 3, 9], kind, 4)
    with pytest.raises(ValueError, match="needs num_groups"):
        build_dictionary([5, 3, 9], kind)
    with pytest.raises(ValueError, match="non-negative"):
        build_dictionary([5, -1, 9], kind, 2)
    with pytest.raises(ValueError, match="all zero"):
        build_dictionary([0, 0], kind, 1)
    with pytest.raises(ValueError, match="unknown dictionary kind"):
        build_dictionary([5, 3, 9], "blocks", 2)


def test_interp_with_k_equal_c_is_the_rank_permutation():
    counts = torch.tensor([40.0, 7.0, 300.0, 1.0, 55.0, 8.0])
    d = build_dictionary(counts, "interp", 6, dtype=torch.float64)
    ranks = counts.argsort().argsort()  # 0 = rarest
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[torch.arange(6), ranks] = 1.0
    assert torch.equal(d, expected)


@pytest.mark.numerics
def test_interp_closed_form_hat_weights():
    c, k = 10, 4
    counts = torch.arange(c, 0, -1).double()  # class i has rank c-1-i
    d = build_dictionary(counts, "interp", k, dtype=torch.float64)
    for i in range(c):
        s = (c - 1 - i) * (k - 1) / (c - 1)  # knot coordinate of class i
        for j in range(k):
            # measured <= 2.2e-16 (1 ulp) on every `make test-portable` setting
            assert d[i, j].item() == pytest.approx(max(0.0, 1.0 - abs(s - j)), abs=1e-14)
    assert ((d > 0).sum(1) <= 2).all()


@pytest.mark.numerics
def test_interp_reproduces_functions_linear_in_rank():
    # Piecewise-linear interpolation is exact on linear functions: knot values a + b·t_j give
    # a + b·r_c for every class.
    c, k = 37, 5
    counts = torch.randperm(c, generator=torch.Generator().manual_seed(1)).double() + 1
    d = build_dictionary(counts, "interp", k, dtype=torch.float64)
    knots = torch.linspace(0, c - 1, k, dtype=torch.float64)
    ranks = counts.argsort().argsort().double()
    # measured <= 1.1e-16 on every `make test-portable` setting
    torch.testing.assert_close(expand(d, 0.3 - 0.02 * knots), 0.3 - 0.02 * ranks)


def test_interp_ties():
    counts = torch.tensor([10.0, 5.0, 5.0, 5.0, 1.0])
    avg = build_dictionary(counts, "interp", 3, dtype=torch.float64)
    # Ranks 1, 2, 3 are shared by the three 5s, so all get rank 2 = knot 1 exactly.
    for i in (1, 2, 3):
        assert torch.equal(avg[i], torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    stable = build_dictionary(counts, "interp", 5, ties="stable", dtype=torch.float64)
    # Stable: ties broken by class index, so class 1 < 2 < 3 in rank and K = C is a permutation.
    assert torch.equal(stable.argmax(1), torch.tensor([4, 1, 2, 3, 0]))
    assert torch.equal(stable.sum(0), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="ties"):
        build_dictionary(counts, "interp", 3, ties="random")


def test_buckets_group_similar_frequencies():
    counts = [1000, 900, 100, 90, 10, 9]
    d = build_dictionary(counts, "buckets", 3)
    # log-range [log 9, log 1000] in three equal bins; column 0 is the rarest bucket.
    assert torch.equal(d.argmax(1), torch.tensor([2, 2, 1, 1, 0, 0]))
    assert torch.equal(d, torch.nn.functional.one_hot(d.argmax(1), 3).float())


def test_buckets_drop_empty_bins_and_handle_zero_counts():
    d = build_dictionary([1, 2, 1000, 2, 1], "buckets", 5)
    # Bin width log(1000)/5 ≈ 1.38: 1 and 2 share bin 0, 1000 is in bin 4, bins 1-3 are empty.
    assert d.shape == (5, 2)
    assert torch.equal(d.argmax(1), torch.tensor([0, 0, 1, 0, 0]))
    z = build_dictionary([0, 3, 3000], "buckets", 3)
    assert torch.equal(z.argmax(1), torch.tensor([0, 0, 1]))
    assert torch.equal(build_dictionary([4, 4, 4], "buckets", 3), torch.ones(3, 1))


@pytest.mark.numerics
def test_inaturalist_size_is_fine_when_k_does_not_divide_c():
    c = 8142
    counts = _zipf_counts(c)
    for kind in ("buckets", "interp"):
        d = build_dictionary(counts, kind, 7)
        assert d.shape[0] == c and d.shape[1] <= 7
        torch.testing.assert_close(d.sum(1), torch.ones(c))
        # Equal counts share a row (the tail of this count vector is full of ties).
        _, inv = torch.unique(counts, return_inverse=True)
        for group in range(0, int(inv.max()) + 1, 97):
            rows = d[inv == group]
            assert (rows == rows[0]).all()
    b = build_dictionary(counts, "buckets", 7)
    assert b.shape[1] == 7
    # Buckets are monotone in frequency: rarer classes never sit in a higher column.
    col = b.argmax(1)
    assert (col[counts.argsort()].diff() >= 0).all()


@pytest.mark.parametrize("kind,k", [("buckets", 4), ("interp", 4), ("per_class", None)])
def test_deterministic_and_equivariant_to_relabelling(kind, k):
    counts = _zipf_counts(25)
    d = build_dictionary(counts, kind, k)
    assert torch.equal(d, build_dictionary(counts.clone(), kind, k))
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    d_perm = build_dictionary(counts[perm], kind, k)
    if kind == "per_class":
        assert torch.equal(d_perm, torch.eye(25))
    else:
        assert torch.equal(d_perm, d[perm])


@pytest.mark.numerics
def test_expand_shapes_and_gradient():
    d = build_dictionary(_zipf_counts(9), "interp", 3, dtype=torch.float64)
    a = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    out = expand(d, a)
    assert out.shape == (9,) and out.dtype == torch.float32
    g = torch.arange(9.0)
    out.backward(g)
    torch.testing.assert_close(a.grad, d.float().T @ g)
    assert expand(d, torch.ones(3, 2)).shape == (9, 2)
    with pytest.raises(ValueError, match="alpha_sub"):
        expand(d, torch.ones(4))


@pytest.mark.numerics
def test_fit_sub_recovers_subspace_parameters():
    d = build_dictionary(_zipf_counts(12), "interp", 4, dtype=torch.float64)
    a = torch.tensor([math.log(0.1), 0.0, 0.3, -0.7], dtype=torch.float64)
    # measured <= 2.7e-15 on every `make test-portable` setting
    torch.testing.assert_close(fit_sub(d, expand(d, a)), a)
    two = torch.stack([a, 2 * a], 1)
    torch.testing.assert_close(fit_sub(d, expand(d, two)), two)
