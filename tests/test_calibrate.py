"""Capture inside attention, the calibration run (e_o and single-layer KL) and its files (tiny models)."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
import yaml
from conftest import build_tiny_model, tiny_config

from kvtuner.calibrate import (
    CalibrationSettings,
    calibrate,
    check_settings,
    load_sensitivity,
    parse_bits,
    write_outputs,
)
from kvtuner.capture import attention_hook, capture_layers
from kvtuner.errors import ConfigError
from kvtuner.precision import Layout, PrecisionPair
from kvtuner.sensitivity import COLUMNS, LayerCapture, attention_output


def gemma_with_scalar(scalar: int = 64):
    """Tiny Gemma 3 (window 24 < sequence) whose query_pre_attn_scalar is not head_dim."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("gemma3")
    config.query_pre_attn_scalar = scalar
    return AutoModelForCausalLM.from_config(config).eval()


def own_attention_outputs(model, ids):
    """What each layer's attention really produced: the input of o_proj `[n, seq, heads * head_dim]`."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, index=i: seen.__setitem__(index, args[0].detach())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ["gemma3", "llama", "mistral", "qwen2"])
def test_captured_attention_recomputes_the_models_own_output(arch):
    model = gemma_with_scalar() if arch == "gemma3" else build_tiny_model(arch)
    ids = torch.randint(3, 128, (3, 48), generator=torch.Generator().manual_seed(1))
    own = own_attention_outputs(model, ids)
    captures = capture_layers(model, ids, query_tokens=16, progress=False)
    assert len(captures) == model.config.num_hidden_layers
    for capture in captures:
        assert capture.query.shape == (3, 4, 16, 16) and capture.key.shape == (3, 2, 48, 16)
        mine = attention_output(capture).transpose(1, 2).reshape(3, 16, -1)
        torch.testing.assert_close(mine, own[capture.layer][:, -16:], atol=1e-5, rtol=1e-4)
    windows = [c.sliding_window for c in captures]
    if arch == "gemma3":
        assert windows == [24, None, 24, None]
        assert captures[0].scaling == pytest.approx(64**-0.5)


def test_recomputation_would_notice_a_missing_window():
    model = gemma_with_scalar()
    ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(2))
    own = own_attention_outputs(model, ids)
    capture = capture_layers(model, ids, query_tokens=16, progress=False)[0]
    unwindowed = dataclasses.replace(capture, sliding_window=None)
    mine = attention_output(unwindowed).transpose(1, 2).reshape(2, 16, -1)
    assert (mine - own[0][:, -16:]).abs().max() > 1e-3


def test_capture_leaves_outputs_and_implementation_unchanged():
    model = build_tiny_model("llama")
    ids = torch.randint(3, 128, (2, 20))
    with torch.no_grad():
        before = model(ids).logits
    capture_layers(model, ids, query_tokens=4, progress=False)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), attention_hook(model, lambda *a: None):
        assert model.config._attn_implementation == "kvtuner_capture"
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, before)
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_parse_bits():
    assert parse_bits("8,2,4") == (2, 4, 8)
    assert parse_bits("4, 16") == (4, 16)
    for bad in ("2,3", "x", "", "32"):
        with pytest.raises(ConfigError, match="--bits"):
            parse_bits(bad)


def test_check_settings_rejects_what_the_model_cannot_run():
    config = tiny_config("llama")  # 512 positions, head_dim 16
    check_settings(CalibrationSettings(seq_len=512, query_tokens=64), config)
    with pytest.raises(
        ConfigError, match=r"--seq-len 600 is longer than the model allows \(512 positions\)"
    ):
        check_settings(CalibrationSettings(seq_len=600), config)
    with pytest.raises(ConfigError, match="--query-tokens"):
        check_settings(CalibrationSettings(seq_len=32, query_tokens=64), config)
    with pytest.raises(ConfigError, match="--group-size must be positive"):
        check_settings(CalibrationSettings(seq_len=64, query_tokens=8, group_size=0), config)
    with pytest.raises(ConfigError, match="nothing to quantize"):
        check_settings(CalibrationSettings(scheme="kivi", seq_len=48, query_tokens=8), config)


def test_settings_resolve_scheme_defaults():
    assert CalibrationSettings(scheme="kivi").layout == Layout("kivi", 32, 32, 32, 4, False)
    per_token = CalibrationSettings(residual_length=16).resolved()
    assert (per_token.group_size, per_token.residual_length, per_token.smooth) == (64, 0, True)


@pytest.fixture(scope="module")
def tiny_result():
    model = build_tiny_model("llama")
    ids = torch.randint(3, 128, (4, 96), generator=torch.Generator().manual_seed(4))
    layer_ids = torch.randint(3, 128, (3, 72), generator=torch.Generator().manual_seed(5))
    settings = CalibrationSettings(samples=4, seq_len=96, query_tokens=16, additivity=5)
    return calibrate(
        model, ids, settings, model_name="tiny-llama", layer_samples=layer_ids, progress=False
    )


def test_calibrate_table_and_metadata(tiny_result):
    table, meta = tiny_result.table, tiny_result.metadata
    assert list(table.columns) == list(COLUMNS) and len(table) == 4 * 9
    wide = table.pivot(index="layer", columns=["key_bits", "value_bits"], values="e_o")
    assert (wide[(8, 8)] < wide[(4, 4)]).all() and (wide[(4, 4)] < wide[(2, 2)]).all()
    for key in (
        "model",
        "num_layers",
        "scheme",
        "group_size",
        "residual_length",
        "text",
        "samples",
        "seq_len",
        "seed",
        "seconds",
        "versions",
    ):
        assert key in meta
    assert meta["model"] == "tiny-llama" and meta["num_layers"] == 4
    assert set(meta["versions"]) == {"kvtuner", "torch", "transformers"}
    kl = tiny_result.layer_kl
    assert sorted(kl.layer.unique()) == [0, 1, 2, 3] and (kl.kl > 0).all()
    # only pairs on the e_o Pareto front of their layer are probed
    from kvtuner.prune import prune_table

    pruned = prune_table(tiny_result.table)
    for layer, rows in kl.groupby("layer"):
        probed = {PrecisionPair(int(k), int(v)) for k, v in zip(rows.key_bits, rows.value_bits)}
        assert probed == set(pruned[layer])
    assert meta["layer_kl"]["samples"] == 3 and meta["layer_kl"]["context"] == 40
    assert -1.0 <= meta["layer_kl"]["spearman_e_o_kl"] <= 1.0
    assert len(tiny_result.additivity) == 5


def test_write_outputs_round_trip(tiny_result, tmp_path):
    paths = write_outputs(tiny_result, tmp_path / "tiny-llama" / "per-token")
    assert set(paths) == {
        "sensitivity",
        "heatmap",
        "metadata",
        "layer_kl",
        "layer_kl_heatmap",
        "additivity",
    }
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table, meta = load_sensitivity(paths["sensitivity"])
    pd.testing.assert_frame_equal(table, tiny_result.table, rtol=1e-5)
    assert meta == yaml.safe_load(paths["metadata"].read_text())
    assert sorted(p.name for p in paths["sensitivity"].parent.iterdir()) == sorted(
        p.name for p in paths.values()
    )


def test_write_outputs_all_or_nothing(tiny_result, tmp_path, monkeypatch):
    import kvtuner.calibrate as calibrate_module

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(calibrate_module, "plot_heatmap", broken)
    with pytest.raises(RuntimeError):
        write_outputs(tiny_result, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_load_sensitivity_errors(tiny_result, tmp_path):
    paths = write_outputs(tiny_result, tmp_path)
    table = pd.read_csv(paths["sensitivity"])
    table.drop(columns="e_o").to_csv(tmp_path / "sensitivity.csv", index=False)
    with pytest.raises(ConfigError, match="missing column"):
        load_sensitivity(tmp_path / "sensitivity.csv")
    table[table.layer < 3].to_csv(tmp_path / "sensitivity.csv", index=False)
    with pytest.raises(ConfigError, match="do not match num_layers 4"):
        load_sensitivity(tmp_path / "sensitivity.csv")
    paths["metadata"].unlink()
    with pytest.raises(ConfigError, match="metadata file not found"):
        load_sensitivity(tmp_path / "sensitivity.csv")
    with pytest.raises(ConfigError, match="not found"):
        load_sensitivity(tmp_path / "nothing.csv")


def test_layer_capture_offset():
    capture = LayerCapture(
        0, torch.zeros(1, 2, 5, 4), torch.zeros(1, 1, 12, 4), torch.zeros(1, 1, 12, 4), 0.5
    )
    assert capture.query_offset == 7
