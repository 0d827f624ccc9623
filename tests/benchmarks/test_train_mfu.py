"""benchmarks/train_mfu.py at --size tiny on the CPU: the numbers it prints follow from each other by its definitions."""

import json

import pytest
import torch

from tests.benchmarks.scripts import load_benchmark

PEAK_TFLOPS = 0.5


def matmul_flops_by_hand(model, shape) -> int:
    """6 x weights x the tokens that pass them: encoder weights and cross-attention keys/values see encoder tokens,
    every other weight (decoder, LM head) decoder tokens."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            encoder_side = name.startswith("encoder.") or name.endswith("inter_attn.kv")
            tokens = shape.seq if (encoder_side or not shape.target) else shape.target
            total += 6 * module.weight.numel() * tokens * shape.batch
    return total


def test_tiny_run_reports_tokens_step_time_and_both_mfus_by_their_definitions(tmp_path, capsys):
    mfu = load_benchmark("train_mfu")
    out = tmp_path / "mfu.json"
    results = mfu.main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--peak-tflops", str(PEAK_TFLOPS),
                        "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == results
    by_model = {r["model"]: r for r in results}
    assert set(by_model) == {"llama", "openba"}
    assert by_model["llama"]["tokens_per_step"] == 2 * 64
    assert by_model["openba"]["tokens_per_step"] == 2 * (48 + 32)  # the trainer's count: encoder + decoder tokens
    for name, row in by_model.items():
        shape = mfu.SIZES["tiny"][name]
        model = mfu.build_model(shape, torch.device("cpu"))
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert row["counted_flops_per_step"] == matmul_flops_by_hand(model, shape)
        assert row["steps_timed"] == 2 and row["step_time_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens_per_step"] / row["step_time_s"], rel=1e-12)
        assert row["mfu"] == pytest.approx(6 * row["params"] * row["tokens_per_s"] / (PEAK_TFLOPS * 1e12), rel=1e-12)
        assert row["counted_mfu"] == pytest.approx(
            row["counted_flops_per_step"] / row["step_time_s"] / (PEAK_TFLOPS * 1e12), rel=1e-12)
        assert row["kernel"].startswith("sdpa") and row["dtype"] == "float32" and row["engine"] == "torch"
        assert f"{row['mfu']:.3f}" in printed and f"{row['counted_mfu']:.3f}" in printed
    # 6NT charges OpenBA's encoder tokens to decoder weights and back: far above what its matmuls do
    openba = by_model["openba"]
    assert openba["counted_flops_per_step"] < 0.5 * 6 * openba["params"] * openba["tokens_per_step"]


def test_peak_comes_from_the_card_name_or_the_flag_and_is_unknown_on_a_cpu():
    mfu = load_benchmark("train_mfu")
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert mfu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert mfu.peak_tflops("NVIDIA H200", None) == 989.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert mfu.peak_tflops("CPU (2 threads)", None) is None
    assert mfu.peak_tflops("NVIDIA H200", 500.0) == 500.0


def test_the_1b_shapes_have_about_a_billion_parameters_and_the_trainer_accepts_their_batches():
    from pretrain.long_context import check_sequence_lengths

    mfu = load_benchmark("train_mfu")
    counts = {}
    for name, shape in mfu.SIZES["1b"].items():
        model = mfu.build_model(shape, torch.device("meta"))
        counts[name] = sum(p.numel() for p in model.parameters())
        for segments in (False, True):
            (batch,) = mfu.make_batches(shape, 1, segments)
            check_sequence_lengths(model.config, batch)  # the trainer's check before its first step
    assert counts == {"llama": 1_100_048_384, "openba": 1_154_931_968}  # the figures the docstring states
