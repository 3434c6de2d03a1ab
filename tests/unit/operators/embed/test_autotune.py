"""Batch-size autotuning: the tuner's decisions on given costs, and the tuner driving the real inner loop."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from operators import columns as C
from operators.embed.autotune import BatchTuner
from operators.embed.embedder import _run_splitting, embed_table, timed
from operators.models.registry import ModelOptions, load, resolve


def feed(tuner: BatchTuner, seconds_per_row: dict[int, float], blocks: int = 40, block_rows: int = 10_000) -> None:
    """Batches as the actor would run them: the tuner's size each time (capped by the block), at these costs."""
    for _ in range(blocks):
        size = tuner.size
        rows = min(size, block_rows)
        tuner.observe(size, rows, float(rows), rows * seconds_per_row[size])


def test_grows_while_it_pays_then_keeps_the_best_size() -> None:
    # per-row cost falls until 128, then rises: 128 is the answer, and 256 was tried once and dropped
    costs = {32: 1.0, 64: 0.7, 128: 0.5, 256: 0.52, 512: 0.4}
    tuner = BatchTuner(32, 512)
    feed(tuner, costs)
    assert tuner.settled and tuner.size == 128
    assert sorted(tuner.trials) == [32, 64, 128, 256]
    assert "settled on 128" in tuner.history[-1] and "256" in tuner.history[-1]


def test_a_gain_under_the_threshold_is_not_a_gain() -> None:
    tuner = BatchTuner(32, 512, gain=1.05)
    feed(tuner, {32: 1.0, 64: 0.97, 128: 0.5})  # 3% faster at 64: not worth twice the memory
    assert tuner.settled and tuner.size == 32


def test_the_limit_and_blocks_smaller_than_the_batch_stop_the_search() -> None:
    limited = BatchTuner(16, 64)
    feed(limited, {16: 1.0, 32: 0.5, 64: 0.25})
    assert limited.settled and limited.size == 64 and "limit" in limited.history[-1]
    assert BatchTuner(64, 100).settled  # no doubling fits under the limit: nothing to search
    # blocks of 40 rows: a 64-row batch is still a 40-row batch, whatever it costs
    small = BatchTuner(32, 1024)
    feed(small, {32: 1.0, 64: 0.5}, block_rows=40)
    assert small.settled and small.size == 32 and "smaller than the batch" in small.history[-1]


def test_warm_up_batches_are_not_counted_and_other_sizes_are_ignored() -> None:
    tuner = BatchTuner(8, 64, samples=2, warmup=1)
    tuner.observe(8, 8, 8.0, 100.0)  # a first batch paying for set-up: skipped
    tuner.observe(4, 4, 4.0, 0.001)  # a batch of another size (an out-of-memory half): ignored
    tuner.observe(8, 8, 8.0, 8.0)
    tuner.observe(8, 8, 8.0, 8.0)
    assert tuner.trials[8].batches == 2 and tuner.trials[8].rate == pytest.approx(1.0)
    assert tuner.size == 16


def test_out_of_memory_halves_the_size_and_caps_it_for_good() -> None:
    tuner = BatchTuner(64, 1024)
    feed(tuner, {64: 1.0, 128: 0.5, 256: 0.25, 512: 0.1}, blocks=8)
    assert tuner.size == 256 and not tuner.settled
    tuner.out_of_memory(256)
    assert tuner.settled and tuner.size == 128 and tuner.limit == 128
    tuner.out_of_memory(100)  # a long text batch later: the cap comes down again
    assert tuner.size == 50


def test_peak_memory_stops_a_doubling_that_would_not_fit() -> None:
    peaks = {32: 0.2, 64: 0.45}  # weights 0.1 of the device; 64 rows peak at 0.45 -> 128 would need ~0.8+
    tuner = BatchTuner(32, 1024, base_memory=0.1, memory_cap=0.7, memory=lambda: peaks[tuner.size])
    feed(tuner, {32: 1.0, 64: 0.5, 128: 0.25})
    assert tuner.settled and tuner.size == 64 and "peak memory 45%" in tuner.history[-1]


def test_timed_reports_out_of_memory_and_the_split_halves_still_run() -> None:
    tuner = BatchTuner(8, 64)

    def run(idx: np.ndarray) -> np.ndarray:
        if len(idx) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return idx * 2

    class Cpu:
        type = "cpu"

    parts = _run_splitting(timed(run, tuner, 8, lambda i: float(len(i)), Cpu()), np.arange(8))
    assert np.concatenate([v for _, v in parts]).tolist() == list(range(0, 16, 2))
    # 8 rows failed, then their 4-row halves: the cap is half the smallest batch that failed
    assert tuner.settled and tuner.limit == 2 and tuner.size == 2
    assert tuner.history == ["out of memory at 8 rows: batch size 8 -> 4", "out of memory at 4 rows: batch size 4 -> 2"]


def test_a_tuned_real_model_gives_the_same_vectors_and_records_its_sizes() -> None:
    """The tuner only changes how rows are batched: the vectors equal fixed-size batches', every row says
    the batch size its block ran at, and the search moved through real measured sizes."""
    from operators.preprocess.transforms import preprocess_images
    from pipelines.demo.sample_data import crops

    spec = resolve("resnet18", ModelOptions(weights="random"))
    bb = load(spec, for_inference=True)
    n = 24
    payloads = crops("chelsea", n, np.random.default_rng(3), size=120)
    table = pa.table({C.KEY: [f"k{i}" for i in range(n)], C.SOURCE: ["s"] * n, C.PAYLOAD: pa.array(payloads, pa.binary()),
                      C.ERR_STAGE: pa.nulls(n, pa.string()), C.ERR_TYPE: pa.nulls(n, pa.string()),
                      C.ERR_MSG: pa.nulls(n, pa.string())})
    pre = preprocess_images(table, spec.preprocessing)
    fixed = embed_table(bb, pre, 2)
    tuner = BatchTuner(2, 8, samples=2, warmup=1, gain=1.0)
    blocks = [embed_table(bb, pre, 2, tuner=tuner) for _ in range(4)]
    sizes = [b[C.BATCH][0].as_py() for b in blocks]
    # the first block measures 2 and moves on to 4; a block at 4 decides whether 8 is tried; 8 is the limit
    assert sizes[:2] == [2, 4] and tuner.settled and sorted(tuner.trials) == sizes[:len(tuner.trials)]
    assert tuner.size in tuner.trials and sizes[-1] == tuner.size
    assert all(t.rate > 0 and t.batches == 2 for t in tuner.trials.values())
    assert "settled on" in tuner.history[-1]
    assert fixed[C.BATCH].to_pylist() == [2] * n
    for b in blocks:
        np.testing.assert_allclose(np.array(b[C.EMBEDDING].to_pylist()), np.array(fixed[C.EMBEDDING].to_pylist()),
                                   atol=1e-4)
