"""Position synthesis: strictly increasing ids inside the window, chunk biases within their bounds and in order, the
question/answer at the window's end; what does not fit is an error; the 9:1 strategy mix."""

import pytest
import torch

from align.positions import PositionConfig, context_biases, sample_generator, synthesize_positions
from core.errors import UserError

CONFIG = PositionConfig(window=1024, chunk_size=16, max_chunks=8)


@pytest.mark.parametrize("strategy", ["continuous", "sparse"])
@pytest.mark.parametrize("seed", range(5))
def test_positions_strictly_increase_inside_the_window_and_the_tail_ends_it(strategy, seed):
    context, tail = 100, 12
    positions, used = synthesize_positions(context, tail, CONFIG, sample_generator(seed), strategy)
    assert used == strategy
    assert positions.shape == (context + tail,)
    assert (positions[1:] > positions[:-1]).all()
    assert positions[0] >= 0 and positions[-1] == CONFIG.window - 1
    assert torch.equal(positions[context:], torch.arange(CONFIG.window - tail, CONFIG.window))


@pytest.mark.parametrize("seed", range(5))
def test_continuous_chunks_keep_their_spacing_order_and_bounds(seed):
    real = 112  # 100 context tokens in chunks of 16 and a 12-token tail
    biases = context_biases([16] * 6 + [4], real, CONFIG, "continuous", sample_generator(seed))
    chunks = biases.split(CONFIG.chunk_size)
    room = CONFIG.window - real
    for j, chunk in enumerate(chunks, start=1):
        assert (chunk == chunk[0]).all()  # contiguous inside a chunk
        assert 1 <= chunk[0] <= j * room / len(chunks)  # b ~ U(1, j (K - k) / N)
    starts = torch.stack([chunk[0] for chunk in chunks])
    assert (starts[1:] >= starts[:-1]).all()  # chunks keep their order


def test_sparse_biases_vary_inside_chunks_and_never_fall():
    biases = context_biases([16] * 6 + [4], 112, CONFIG, "sparse", sample_generator(0))
    assert (biases[1:] >= biases[:-1]).all()
    assert len(set(biases[: CONFIG.chunk_size].tolist())) > 1


def test_positions_spread_over_the_window():
    positions, _ = synthesize_positions(128, 8, CONFIG, sample_generator(1), "continuous")
    assert positions[127] > 4 * 136  # the real length is 136; the context reaches far into the 1024 window


def test_strategies_mix_nine_to_one():
    config = PositionConfig(window=1024, chunk_size=16, max_chunks=8)
    used = [synthesize_positions(64, 8, config, sample_generator(s))[1] for s in range(2000)]
    assert used.count("sparse") / len(used) == pytest.approx(0.1, abs=0.025)


def test_same_seed_same_positions_and_plain_positions_without_synthesis():
    a, _ = synthesize_positions(64, 8, CONFIG, sample_generator(3, 7))
    b, _ = synthesize_positions(64, 8, CONFIG, sample_generator(3, 7))
    assert torch.equal(a, b)
    plain, used = synthesize_positions(64, 8, PositionConfig(synthesize=False, window=128, chunk_size=16,
                                                             max_chunks=8), sample_generator(0))
    assert used == "plain" and torch.equal(plain, torch.arange(72))


def test_window_equal_to_the_real_length_leaves_no_gaps():
    config = PositionConfig(window=72, chunk_size=16, max_chunks=8)
    positions, _ = synthesize_positions(64, 8, config, sample_generator(0), "sparse")
    assert torch.equal(positions, torch.arange(72))


def test_uneven_chunks_from_the_data_each_get_their_own_bias():
    chunks = [10, 16, 3, 12]
    positions, _ = synthesize_positions(chunks, 5, CONFIG, sample_generator(2), "continuous")
    gaps = (positions[1:] - positions[:-1]).tolist()
    boundaries = {9, 25, 28}  # last token of each chunk but the last
    assert all(gap == 1 for i, gap in enumerate(gaps) if i not in boundaries and i < sum(chunks) - 1)
    assert positions[0] >= 1 and any(gaps[i] > 1 for i in boundaries)  # the skips sit between chunks


def test_context_longer_than_the_real_chunks_or_the_window_is_an_error():
    with pytest.raises(UserError, match="exceeds the real context"):
        synthesize_positions(8 * 16 + 1, 4, CONFIG, sample_generator(0))
    with pytest.raises(UserError, match="exceeds the real context"):
        synthesize_positions([4] * 9, 4, CONFIG, sample_generator(0))
    with pytest.raises(UserError, match="chunk_size"):
        synthesize_positions([17, 4], 4, CONFIG, sample_generator(0))
    with pytest.raises(UserError, match="exceeds the synthesised window"):
        synthesize_positions(100, 1000, CONFIG, sample_generator(0))
