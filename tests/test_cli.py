"""The lctriton command line: compress, decompress, inspect and demo, end to end."""

import json

import pytest
import torch

import lctriton
from lctriton import cli


def _model_states(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    second = model.state_dict()
    torch.save(first, tmp_path / "a.pt")
    torch.save(second, tmp_path / "b.pt")
    return first, second


def test_compress_chain_decompress_inspect(tmp_path, capsys):
    first, second = _model_states(tmp_path)
    assert cli.main([ "compress", str(tmp_path / "a.pt"), str(tmp_path / "a.lct")]) == 0
    assert cli.main(["compress", str(tmp_path / "b.pt"), str(tmp_path / "b.lct"), "--base", str(tmp_path / "a.lct")]) == 0
    out = capsys.readouterr().out
    assert "key" in out and "delta" in out
    assert cli.main(["decompress", str(tmp_path / "b.lct"), str(tmp_path / "b2.pt"),
                     "--base", str(tmp_path / "a.lct")]) == 0
    restored = torch.load(tmp_path / "b2.pt", weights_only=True)
    bounds = {t["name"]: t["error_bound"] for t in lctriton.inspect(tmp_path / "b.lct")["tensors"]}
    for k, v in second.items():
        assert (restored[k] - v).abs().max() <= bounds[k] * 1.001
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "b.lct")]) == 0
    table = capsys.readouterr().out
    assert "0.weight" in table and "lc/1" in table and "delta checkpoint" in table
    assert cli.main(["inspect", "--json", str(tmp_path / "b.lct")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["delta"] and {t["name"] for t in info["tensors"]} == set(second)


def test_lossless_and_bits_flags(tmp_path):
    _, second = _model_states(tmp_path)
    assert cli.main(["compress", str(tmp_path / "b.pt"), str(tmp_path / "b.lct"), "--base", str(tmp_path / "a.pt"),
                     "--lossless"]) == 0
    restored = lctriton.load(tmp_path / "b.lct", base=torch.load(tmp_path / "a.pt", weights_only=True))
    assert all(torch.equal(restored[k], v) for k, v in second.items())
    assert cli.main(["compress", str(tmp_path / "b.pt"), str(tmp_path / "c.lct"), "--base", str(tmp_path / "a.pt"),
                     "--bits", "5", "--exact", "2.*"]) == 0
    info = lctriton.inspect(tmp_path / "c.lct")
    assert {t["name"]: t["codec"] for t in info["tensors"]}["2.weight"] == "raw/1"


def test_delta_floor_flag(tmp_path, capsys):
    """``--delta-floor`` reaches the codec: ``none`` keeps buckets the default floor drops;
    an out-of-range value is the codec's error, a word is argparse's."""
    first, _ = _model_states(tmp_path)
    base = str(tmp_path / "a.pt")
    # Changes of 2**-12 to 2**-6 of each tensor's typical magnitude: floors 8 and 10 keep
    # different shares of them.
    g = torch.Generator().manual_seed(0)
    small = {}
    for k, v in first.items():
        typical = v.abs().median()
        small[k] = v + typical * torch.exp2(-12 + 6 * torch.rand(v.shape, generator=g))
    torch.save(small, tmp_path / "s.pt")
    sizes = {}
    for floor in ("none", "8", "10"):
        out = tmp_path / f"s{floor}.lct"
        assert cli.main(["compress", str(tmp_path / "s.pt"), str(out), "--base", base, "--delta-floor", floor,
                         "--no-progress"]) == 0
        sizes[floor] = out.stat().st_size
    default = tmp_path / "default.lct"
    assert cli.main(["compress", str(tmp_path / "s.pt"), str(default), "--base", base, "--no-progress"]) == 0
    assert default.read_bytes() == (tmp_path / "s10.lct").read_bytes()
    assert sizes["8"] < sizes["10"] < sizes["none"]
    capsys.readouterr()
    assert cli.main(["compress", str(tmp_path / "s.pt"), str(tmp_path / "x.lct"), "--base", base,
                     "--delta-floor", "40"]) == 1
    assert "delta_floor must be None or an int from 0 to 32, got 40" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compress", str(tmp_path / "s.pt"), str(tmp_path / "x.lct"), "--delta-floor", "low"])
    assert "expected an int or 'none', got 'low'" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    _model_states(tmp_path)
    (tmp_path / "junk.lct").write_bytes(b"not a checkpoint at all" * 10)
    assert cli.main(["inspect", str(tmp_path / "junk.lct")]) == 1
    assert "not an lctriton container" in capsys.readouterr().err
    assert cli.main(["compress", str(tmp_path / "a.pt"), str(tmp_path / "x.lct"), "--bits", "12"]) == 1
    assert "bits" in capsys.readouterr().err
    lctriton_main = cli.main
    assert lctriton_main(["compress", str(tmp_path / "b.pt"), str(tmp_path / "b.lct"), "--base", str(tmp_path / "a.pt")]) == 0
    assert cli.main(["decompress", str(tmp_path / "b.lct"), str(tmp_path / "o.pt")]) == 1
    assert "base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compress", str(tmp_path / "missing.pt"), str(tmp_path / "y.lct")])


def test_format_versions_and_convert(tmp_path, capsys):
    """``--format-version 1`` writes a file older readers take; ``convert`` rewrites a file in
    either version without decoding it (the same tensors come back), and refuses a file whose
    sections fail their checksums."""
    _, second = _model_states(tmp_path)
    v1, v2 = tmp_path / "v1.lct", tmp_path / "v2.lct"
    assert cli.main(["compress", str(tmp_path / "b.pt"), str(v1), "--base", str(tmp_path / "a.pt"),
                     "--format-version", "1", "--no-progress"]) == 0
    assert lctriton.inspect(v1)["version"] == "1.0"
    assert f"-> {v1.stat().st_size:,} bytes" in capsys.readouterr().out  # the file written
    assert cli.main(["convert", str(v1), str(v2)]) == 0
    assert "format 2.0" in capsys.readouterr().out
    assert lctriton.inspect(v2)["version"] == "2.0" and v2.stat().st_size < v1.stat().st_size
    back = tmp_path / "back.lct"
    assert cli.main(["convert", str(v2), str(back), "--format-version", "1"]) == 0
    assert back.read_bytes() == v1.read_bytes()
    base = torch.load(tmp_path / "a.pt", weights_only=True)
    one, two = lctriton.load(v1, base=base), lctriton.load(v2, base=base)
    assert all(torch.equal(one[k], two[k]) for k in second)
    damaged = bytearray(v2.read_bytes())
    damaged[100] ^= 0xFF  # inside the first section
    (tmp_path / "damaged.lct").write_bytes(bytes(damaged))
    assert cli.main(["convert", str(tmp_path / "damaged.lct"), str(tmp_path / "out.lct")]) == 1
    assert "CRC-32" in capsys.readouterr().err and not (tmp_path / "out.lct").exists()
    with pytest.raises(SystemExit):
        cli.main(["convert", str(v1), str(v2), "--format-version", "3"])


def test_help_is_there(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for word in ("compress", "decompress", "inspect", "convert", "demo", "--base"):
        assert word in text


def test_demo_rolls_back_and_restores_every_checkpoint(tmp_path, capsys):
    assert cli.main(["demo", "--checkpoints", "4", "--interval", "5", "--fail-at", "13",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "restored %" in out and "stall ms" in out and out.count(" delta ") == 3
    flat = " ".join(out.split())  # the summary is wrapped
    assert "corrupted batch at step 13 -> loss nan" in flat
    assert "rollback to the 'clean' checkpoint of step 10" in flat
    assert "4 of 4 checkpoints restored" in flat
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*.lct"))) == 4

    from lctriton import demo

    result = demo.run_demo(tmp_path / "lib", checkpoints=3, interval=4, fail_at=6, make_plot=False)
    event = result.rollback
    assert (event.failed_step, event.restored_step, event.steps_redone) == (6, 4, 2)
    assert event.reason == "non-finite loss" and event.discarded_steps == ()
    assert [r.step for r in result.rows] == [4, 8, 12]
    assert [r.kind for r in result.rows] == ["key", "delta", "delta"]
    for r in result.rows:
        assert r.restored and r.max_abs_error < 0.1 and abs(r.accuracy - r.restored_accuracy) < 5
    assert result.rows[0].max_abs_error == 0  # the key is lossless
    assert result.rows[-1].tags == ("clean",) and result.plot_path is None
    assert [p.step for p in result.losses if p.discarded] == [5, 6]
    assert sum(not p.discarded for p in result.losses) == 12
    assert result.stall_mean_s > 0 and len(result.torch_save_s) == 3 and result.stall_fraction > 0
