"""PagedRunner equals SerialRunner: every family, quantized KV, packed weights, over batches mixing prompt chunks
and decode tokens of different lengths, with a truncation, an attention-sink drop and a shared prefix on the way.

Both runners play the same schedule over their own slots, each feeding its own greedy tokens back: greedy
tokens must be identical at every step and logits close (float32). Block size 16, so sequences span several
blocks and a prompt chunk starts inside one.
"""

from __future__ import annotations

from pathlib import Path

import model_factory
import pytest
import torch
from family_check import prompt
from model_factory import randomize_biases
from quant_factory import every_matrix, opened_packed

import chatcore
from chatcore.batch.paged import PagedPool, PagedSlot
from chatcore.batch.paged_runner import PagedRunner
from chatcore.batch.runner import SerialRunner, Work
from chatcore.checkpoint import LoadOptions, load_engine
from chatcore.errors import PromptTooLong

pytestmark = pytest.mark.usefixtures("one_thread")

BS = 16
FAMILIES = {  # name: (factory, overrides): windows short enough that the prompts run past them
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 24}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {}),
    "bloom": ("bloom", {}),
    "mpt": ("mpt", {}),
}


def _load(path: Path, **kw: object) -> chatcore.Engine:
    return chatcore.load(path, device="cpu", dtype="float32", attention="torch", **kw)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> chatcore.Engine:
    family, overrides = FAMILIES[request.param]
    make = getattr(model_factory, f"make_{family}_dir")
    return _load(randomize_biases(make(tmp_path_factory.mktemp(f"paged-{request.param}"), seed=3, **overrides)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return randomize_biases(model_factory.make_llama_dir(tmp_path_factory.mktemp("paged-llama"), seed=4))


def _schedule(runner, drops: bool = True) -> list[tuple[list[int], torch.Tensor]]:  # noqa: ANN001
    """Ten steps over four sequences: A (a 44-token prompt in chunks of 20 and 24), B (23 at once), C (7, from
    step 1), D (A's first 32 tokens + 5 of its own, from step 3: shares A's two full blocks on the paged runner).
    B is cut back to 10 tokens and given 6 new ones at step 5; A drops [4, 20) (sinks) at step 6. Returns each
    step's greedy tokens and logits."""
    a, b, c = prompt(44, seed=11), prompt(23, seed=12), prompt(7, seed=13)
    d = a[:32] + prompt(5, seed=14)
    chunks = {"A": [a[:20], a[20:]], "B": [b], "C": [], "D": []}
    slots = {k: runner.new_slot(200) for k in "ABCD"}
    last: dict[str, int] = {}
    out = []
    for step in range(10):
        if step == 1:
            chunks["C"] = [c]
        if step == 3:
            chunks["D"] = [d]
        if step == 5:
            slots["B"].truncate(10)
            chunks["B"] = [prompt(6, seed=15)]
        if step == 6 and drops:
            slots["A"].drop(4, 20)
        works, names = [], []
        for name in "ABCD":
            if chunks[name]:
                works.append(Work(slots[name], chunks[name].pop(0)))
            elif name in last:
                works.append(Work(slots[name], [last[name]]))
            else:
                continue
            names.append(name)
        logits = runner.run(works)
        tokens = logits.argmax(-1).tolist()
        last.update(zip(names, tokens, strict=True))
        out.append((tokens, logits))
    return out


def _check_equal(engine: chatcore.Engine, pool: PagedPool, drops: bool = True, atol: float = 1e-4) -> None:
    serial = _schedule(SerialRunner(engine.model), drops)
    runner = PagedRunner(engine.model, pool)
    paged = _schedule(runner, drops)
    for i, ((ts, ls), (tp, lp)) in enumerate(zip(serial, paged, strict=True)):
        assert tp == ts, f"step {i}: greedy tokens differ"
        torch.testing.assert_close(lp, ls, atol=atol, rtol=1e-4, msg=f"step {i}: logits differ")
    assert runner.shared_tokens == 32   # D took A's two full blocks


def test_paged_runner_equals_serial_runner(family_engine: chatcore.Engine) -> None:
    _check_equal(family_engine, PagedPool.for_model(family_engine.model, num_blocks=40, block_size=BS))


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_kv(llama_dir: Path, kv_dtype: str) -> None:
    engine = _load(llama_dir, kv_dtype=kv_dtype)
    pool = PagedPool.for_model(engine.model, num_blocks=40, block_size=BS)
    assert pool.k.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[kv_dtype] and pool.k_scale is not None
    _check_equal(engine, pool)


def test_packed_weights(tmp_path: Path) -> None:
    path = randomize_biases(model_factory.make_llama_dir(tmp_path / "m", seed=5))
    plan = every_matrix("q4_1", v_proj="q8_0")
    engine = load_engine(path, opened_packed(path, plan), torch.device("cpu"), torch.float32,
                         LoadOptions(attention="torch"))
    _check_equal(engine, PagedPool.for_model(engine.model, num_blocks=40, block_size=BS))


def test_math_backend_and_gemma_window(tmp_path: Path) -> None:
    engine = chatcore.load(model_factory.make_gemma3_dir(tmp_path / "g", seed=6), device="cpu", dtype="float32",
                           attention="math")
    _check_equal(engine, PagedPool.for_model(engine.model, num_blocks=40, block_size=BS))


def test_runner_refuses_bad_batches(llama_dir: Path) -> None:
    engine = _load(llama_dir)
    runner = PagedRunner(engine.model, PagedPool.for_model(engine.model, num_blocks=8, block_size=BS))
    slot = runner.new_slot(64)
    with pytest.raises(ValueError, match="at most once"):
        runner.run([Work(slot, [3]), Work(slot, [4])])
    with pytest.raises(ValueError, match="at least one"):
        runner.run([Work(slot, [])])
    with pytest.raises(ValueError, match="runner's new_slot"):
        runner.run([Work(engine.model.new_slot(64), [3])])
    with pytest.raises(PromptTooLong, match="context window"):
        runner.run([Work(slot, prompt(65, seed=1))])
    assert isinstance(slot, PagedSlot) and slot.length == 0 and not slot.blocks
    runner.run([Work(slot, prompt(20, seed=2))])
    assert slot.length == 20 and len(slot.blocks) == 2
    runner.release(slot)
    assert slot.length == 0 and runner.pool.allocator.in_use == 0


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "bloom"])
@pytest.mark.parametrize("attention", ["auto", "torch"])
def test_paged_runner_equals_serial_runner_on_cuda(tmp_path: Path, family: str, attention: str) -> None:
    """The same schedule on the GPU in float32 (each backend's paged entry; one not registered takes torch)."""
    name, overrides = FAMILIES[family]
    path = randomize_biases(getattr(model_factory, f"make_{name}_dir")(tmp_path / family, seed=3, **overrides))
    engine = chatcore.load(path, device="cuda", dtype="float32", attention=attention, cuda_graphs=False)
    _check_equal(engine, PagedPool.for_model(engine.model, num_blocks=40, block_size=BS), atol=2e-3)
