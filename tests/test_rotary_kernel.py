"""The fused rotary kernel for prompt chunks computes what :meth:`Rotary.apply`'s plain ops compute.

On the CPU it runs under Triton's interpreter (tests/conftest.py); the GPU case checks the compiled kernel in
bf16 on a fused projection's strided slice, the way the model hands it over, and the dispatch in ``apply``.
"""

from __future__ import annotations

import pytest
import torch

from chatcore.layers.rope import Rotary

pytest.importorskip("triton")


def _plain(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].double(), x[..., half:].double()
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


@pytest.mark.parametrize(("t", "h", "d"), [(5, 3, 16), (9, 8, 64), (4, 40, 128), (3, 2, 80)])
def test_rotate_matches_the_definition(t: int, h: int, d: int) -> None:
    from chatcore.layers.triton_fused import rotate

    g = torch.Generator().manual_seed(t * h + d)
    fused = torch.randn(t, h * d + 7, generator=g)   # a slice of a wider projection: rows strided
    x = fused[:, 3 : 3 + h * d].view(t, h, d)
    angle = torch.rand(t, d // 2, generator=g) * 6
    out = rotate(x, angle.cos(), angle.sin())
    assert out.shape == (t, h, d) and out.is_contiguous()
    assert (out.double() - _plain(x, angle.cos(), angle.sin())).abs().max().item() < 1e-5


def test_rotate_refuses_a_table_of_the_wrong_shape() -> None:
    from chatcore.layers.triton_fused import rotate

    with pytest.raises(ValueError, match="cos/sin"):
        rotate(torch.zeros(4, 2, 8), torch.zeros(3, 4), torch.zeros(3, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_takes_the_kernel_for_gpu_prompt_chunks(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2048, 6144, generator=g, device="cuda").to(dtype)
    q = qkv[:, :4096].view(2048, 32, 128)
    angle = torch.rand(2048, 64, generator=g, device="cuda") * 100
    cos, sin = angle.cos().to(dtype)[:, None, :], angle.sin().to(dtype)[:, None, :]
    out = Rotary.apply(q, cos, sin)
    assert out.is_contiguous()   # the fused kernel's output (the plain ops' torch.cat is contiguous too)
    ref = _plain(q, cos[:, 0], sin[:, 0])
    assert (out.double() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    half = q.shape[-1] // 2
    plain = torch.cat((q[..., :half] * cos - q[..., half:] * sin, q[..., half:] * cos + q[..., :half] * sin), -1)
    assert (out.double() - ref).abs().mean() <= (plain.double() - ref).abs().mean()   # rounds once, not thrice


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "hq", "hkv", "d"), [(5, 6, 2, 16), (1, 32, 8, 128), (3, 5, 5, 80)])
def test_rope_write_rotates_q_and_writes_the_pools(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> None:
    """The batched step's one launch (q rotated; k rotated and v copied into their pool rows) equals the rotate
    kernel bit for bit and leaves every other pool row alone."""
    check_rope_write(n, hq, hkv, d, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "hq", "hkv", "d"), [(1, 32, 8, 128), (32, 32, 8, 64), (64, 40, 8, 128)])
def test_gpu_rope_write_compiled(n: int, hq: int, hkv: int, d: int) -> None:
    check_rope_write(n, hq, hkv, d, torch.bfloat16, "cuda")


def check_rope_write(n: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: str) -> None:
    from chatcore.layers.triton_fused import rotate
    from chatcore.layers.triton_rope_write import rope_write

    g = torch.Generator().manual_seed(n * hq + d)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=g).to(device, dtype)   # a fused projection, split
    q, k, v = (t.view(n, -1, d) for t in qkv.split((hq * d, hkv * d, hkv * d), dim=-1))
    angle = torch.rand(n, d // 2, generator=g) * 6
    cos, sin = angle.cos().to(device, dtype), angle.sin().to(device, dtype)
    k_flat = torch.full((2 * n + 10, hkv, d), 7.0, dtype=dtype, device=device)
    v_flat = torch.full((2 * n + 10, hkv, d), 7.0, dtype=dtype, device=device)
    rows = torch.randperm(2 * n + 10, generator=g)[:n].to(device)
    out = rope_write(q, k, v, cos, sin, rows, k_flat, v_flat)
    assert out.shape == (n, hq, d) and out.is_contiguous()
    assert out.view(torch.int16).equal(rotate(q, cos, sin).view(torch.int16))
    assert k_flat[rows].view(torch.int16).equal(rotate(k, cos, sin).view(torch.int16))
    assert v_flat[rows].equal(v)
    rest = torch.ones(2 * n + 10, dtype=torch.bool, device=device)
    rest[rows] = False
    assert (k_flat[rest] == 7).all() and (v_flat[rest] == 7).all()
    with pytest.raises(ValueError, match="cos/sin"):
        rope_write(q, k, v, cos[:, :-1], sin, rows, k_flat, v_flat)
