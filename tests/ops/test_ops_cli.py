"""`loraforge resize`, `loraforge merge` (LoRAs into one) and `check LORA` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.commands.lora_report import check_lora_files
from loraforge.ops.lora_file import read_lora_file

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
META = {
    "ss_base_model_version": "sd_v1",
    "ss_network_dim": "16",
    "ss_network_alpha": "8",
    "loraforge_recipe": "{}",
}


@pytest.fixture
def lora(tmp_path: Path, synth) -> Path:
    tensors = {
        **synth.lora(Q, 320, 320, 16, alpha=8, dtype=torch.float16),
        **synth.lora(K, 320, 320, 16, alpha=8, seed=1, dtype=torch.float16),
    }
    return synth.save(tmp_path / "mychar.safetensors", tensors, META)


def test_resize_writes_default_output_with_updated_metadata(cli, lora: Path) -> None:
    result = cli("resize", lora, "--rank", "4")
    assert result.code == 0, result.err
    out = lora.with_name("mychar-r4.safetensors")
    assert "kept" in result.out and str(out) in result.out
    written = read_lora_file(out)
    assert written.tensors[f"{Q}.lora_down.weight"].shape == (4, 320)
    assert written.tensors[f"{Q}.lora_down.weight"].dtype == torch.float16  # input precision kept
    meta = written.metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["loraforge_recipe"] == "{}" and len(meta["sshs_model_hash"]) == 64
    assert cli("resize", lora, "--rank", "4").code == 2  # exists, no --force
    assert cli("resize", lora, "--rank", "4", "--force").code == 0


def test_resize_and_merge_print_a_summary_and_the_table_only_with_verbose(
    cli, lora: Path, tmp_path: Path
) -> None:
    quiet = cli("resize", lora, "-r", "4", "-o", tmp_path / "q.safetensors")
    assert quiet.code == 0, quiet.err
    lines = quiet.out.strip().splitlines()
    assert "┃" not in quiet.out and len(lines) <= 6, quiet.out
    text = " ".join(quiet.out.split())
    assert "2 modules; new ranks: 4 x2 (was up to 16)" in text
    assert "lowest" in text and "median" in text and "overall" in text
    assert K not in text or Q not in text  # only the lowest module is named
    loud = cli("resize", lora, "-r", "4", "-o", tmp_path / "l.safetensors", "--verbose")
    assert loud.code == 0 and "┃" in loud.out  # the per-module table
    merged = cli(
        "merge", "-l", str(lora), "-l", str(lora), "-r", "2", "-o", tmp_path / "m.safetensors"
    )
    assert merged.code == 0, merged.err
    assert "┃" not in merged.out and "new ranks: 2 x2" in merged.out
    doc = json.loads(
        cli("resize", lora, "-r", "4", "-o", tmp_path / "j.safetensors", "-f", "json").out
    )
    assert len(doc["modules"]) == 2 and doc["overall"]["rank_histogram"] == {"4": 2}
    assert 0 < doc["overall"]["median_retained_fro"] <= 1


def test_resize_json_dynamic_and_precision(cli, lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.safetensors"
    result = cli(
        "resize",
        lora,
        "-r",
        "8",
        "-m",
        "sv_fro",
        "-p",
        "0.5",
        "-o",
        out,
        "--save-precision",
        "bf16",
        "-f",
        "json",
    )
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["method"] == "sv_fro" and doc["dtype"] == "bfloat16"
    assert {m["name"] for m in doc["modules"]} == {Q, K}
    assert all(1 <= m["new_rank"] <= 8 and m["retained_fro"] >= 0.5 for m in doc["modules"])
    assert read_lora_file(out).metadata["ss_network_dim"] in ("Dynamic", *map(str, range(1, 9)))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-r", "4", "-m", "sv_fro"], "needs --param"),
        (["-r", "4", "-m", "sv_fro", "-p", "1.5"], "fraction in (0, 1]"),
        (["-r", "4", "-m", "sv_ratio", "-p", "0.5"], "ratio >= 1"),
        (["-r", "0"], "greater than or equal to 1"),
    ],
)
def test_resize_bad_options_exit_2(cli, lora: Path, args: list[str], message: str) -> None:
    result = cli("resize", lora, *args)
    assert result.code == 2 and message in result.err


def test_resize_user_errors_exit_2_without_traceback_or_output(cli, tmp_path: Path, synth) -> None:
    missing = cli("resize", tmp_path / "nope.safetensors", "-r", "4")
    assert missing.code == 2 and "no such file" in missing.err
    torch.save(synth.lora(Q, 8, 8, 2, alpha=1), tmp_path / "old.ckpt")
    pickled = cli("resize", tmp_path / "old.ckpt", "-r", "1", "-o", tmp_path / "o.safetensors")
    assert pickled.code == 2 and "--allow-pickle" in pickled.err
    allowed = cli(
        "resize",
        tmp_path / "old.ckpt",
        "-r",
        "1",
        "-o",
        tmp_path / "o.safetensors",
        "--allow-pickle",
    )
    assert allowed.code == 0, allowed.err
    bad = synth.lora(Q, 8, 8, 2, alpha=1)
    bad[f"{Q}.lora_up.weight"] = torch.randn(8, 3)
    synth.save(tmp_path / "bad.safetensors", bad)
    broken = cli(
        "resize", tmp_path / "bad.safetensors", "-r", "1", "-o", tmp_path / "b.safetensors"
    )
    assert broken.code == 2 and "rank 3 vs 2" in broken.err
    cuda = cli(
        "resize",
        tmp_path / "o.safetensors",
        "-r",
        "1",
        "--device",
        "cuda",
        "-o",
        tmp_path / "c.safetensors",
    )
    if not torch.cuda.is_available():
        assert cuda.code == 2 and "--device cpu" in cuda.err
    for result in (missing, pickled, broken):
        assert "Traceback" not in result.err
    assert not (tmp_path / "b.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_merge_loras_concat_and_exact(cli, lora: Path, tmp_path: Path, synth) -> None:
    other = synth.save(
        tmp_path / "other.safetensors", synth.lora(Q, 320, 320, 8, alpha=8, seed=9), META
    )
    concat = cli(
        "merge",
        "--lora",
        f"{lora}:0.8",
        "--lora",
        f"{other}:-0.5",
        "-o",
        tmp_path / "c.safetensors",
    )
    assert concat.code == 0, concat.err
    merged = read_lora_file(tmp_path / "c.safetensors")
    assert merged.tensors[f"{Q}.lora_down.weight"].shape[0] == 24
    base = read_lora_file(lora).tensors
    want = 0.8 * synth.delta(base, Q) - 0.5 * synth.delta(
        synth.lora(Q, 320, 320, 8, alpha=8, seed=9), Q
    )
    torch.testing.assert_close(synth.delta(merged.tensors, Q), want, rtol=1e-2, atol=1e-2)
    assert merged.metadata["ss_base_model_version"] == "sd_v1"
    assert "concat" in merged.metadata["ss_training_comment"]
    exact = cli(
        "merge",
        "-l",
        f"{lora}:0.8",
        "-l",
        f"{other}:-0.5",
        "-r",
        "4",
        "-o",
        tmp_path / "e.safetensors",
        "-f",
        "json",
    )
    assert exact.code == 0, exact.err
    doc = json.loads(exact.out)
    assert doc["mode"] == "exact" and all(m["new_rank"] == 4 for m in doc["modules"])
    assert 0 < doc["overall"]["retained_fro"] < 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "at least one --lora"),
        (["--mode", "exact"], "needs --rank"),
        (["--mode", "concat", "--rank", "4"], "drop --rank"),
        (["--extract", "--rank", "4"], "not --lora"),
        (["--tuned", "x"], "only used with --extract"),
    ],
)
def test_merge_usage_errors(cli, lora: Path, tmp_path: Path, args: list[str], message: str) -> None:
    lora_args = [] if args == [] else ["--lora", str(lora)]
    result = cli("merge", *lora_args, *args, "-o", tmp_path / "m.safetensors")
    assert result.code == 2 and message in result.err


def test_check_lora_files_exit_codes(
    tmp_path: Path, lora: Path, synth, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert check_lora_files([lora], "json", strict=False) == 0
    doc = json.loads(capsys.readouterr().out)[0]
    assert doc["ok"] and doc["family"] == "sd1" and doc["algorithm"] == "lora"
    assert doc["coverage"][0]["component"] == "unet" and doc["coverage"][0]["modules"] == 2
    no_alpha = synth.save(
        tmp_path / "noalpha.safetensors",
        synth.lora(Q, 320, 320, 4),
        {"ss_base_model_version": "sd_v1"},
    )
    assert check_lora_files([no_alpha], "table", strict=False) == 0
    assert check_lora_files([no_alpha], "table", strict=True) == 1
    nan = synth.lora(Q, 320, 320, 4, alpha=1)
    nan[f"{Q}.lora_up.weight"][0, 0] = float("inf")
    broken = synth.save(tmp_path / "nan.safetensors", nan)
    (tmp_path / "cut.safetensors").write_bytes(lora.read_bytes()[:200])
    capsys.readouterr()
    assert (
        check_lora_files([lora, broken, tmp_path / "cut.safetensors"], "table", strict=False) == 1
    )
    shown = capsys.readouterr().out
    assert (
        "NaN or infinite" in shown and "broken" in shown and "truncated" in shown
    ) or "not a readable" in shown


def test_check_command_routes_lora_files(cli, lora: Path) -> None:
    result = cli("check", lora)
    assert result.code == 0, result.out + result.err
    assert "SD 1.x" in result.out


def test_resize_restores_text_model_in_text_encoder_names(cli, tmp_path: Path, synth) -> None:
    # lycoris-lora under transformers >= 5 writes these; no UI loads them.
    flat = "lora_te_encoder_layers_0_self_attn_q_proj"
    kohya = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors = {
        **synth.lora(flat, 32, 32, 8, alpha=4),
        **synth.lora(Q, 320, 320, 8, alpha=4, seed=1),
    }
    source = synth.save(tmp_path / "flat.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    assert cli("check", source).code == 1  # the names are an error for `check`

    out = tmp_path / "fixed.safetensors"
    result = cli("resize", source, "--rank", "8", "-o", out)
    assert result.code == 0, result.err
    assert "1 text-encoder module name(s) lacked 'text_model'" in result.err and flat in result.err
    written = read_lora_file(out).tensors
    assert not [k for k in written if k.startswith(f"{flat}.")]
    # rank unchanged: the module's delta survives the rename exactly
    torch.testing.assert_close(
        synth.delta(written, kohya), synth.delta(tensors, flat), rtol=1e-3, atol=1e-3
    )
    assert cli("check", out).code == 0


def test_merged_loras_keep_resolution_triggers_and_tags(cli, tmp_path: Path, synth) -> None:
    def trained(name: str, trigger: str, folder: str, seed: int) -> Path:
        meta = {
            **META,
            "ss_resolution": "(96, 96)",
            "modelspec.resolution": "96x96",
            "modelspec.trigger_phrase": trigger,
            "modelspec.tags": f"{trigger}, shapes",
            "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 5, "img_count": 12}}),
            "ss_tag_frequency": json.dumps({folder: {trigger: 12, "red": 3}}),
        }
        return synth.save(tmp_path / name, synth.lora(Q, 320, 320, 4, alpha=4, seed=seed), meta)

    a, b = trained("a.safetensors", "lfa", "5_lfa", 1), trained("b.safetensors", "lfb", "5_lfb", 2)
    for mode in ("concat", "exact"):
        out = tmp_path / f"{mode}.safetensors"
        extra = ["-r", "4"] if mode == "exact" else []
        assert cli("merge", "-l", str(a), "-l", str(b), *extra, "-o", out).code == 0
        meta = read_lora_file(out).metadata
        assert meta["modelspec.resolution"] == "96x96" and meta["ss_resolution"] == "(96, 96)"
        assert meta["modelspec.trigger_phrase"] == "lfa, lfb"
        assert meta["modelspec.tags"] == "lfa, shapes, lfb"
        assert json.loads(meta["ss_tag_frequency"]) == {
            "5_lfa": {"lfa": 12, "red": 3},
            "5_lfb": {"lfb": 12, "red": 3},
        }
        assert set(json.loads(meta["ss_dataset_dirs"])) == {"5_lfa", "5_lfb"}


def test_check_coverage_of_chosen_targets_does_not_read_as_missing_modules(
    lora: Path, capsys
) -> None:
    assert check_lora_files([lora], "table", strict=False) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "2 (unet 2); kohya's default targets on the full-size model: unet" in text
    assert "/" not in text.split("modules", 1)[1].split("ranks", 1)[0]


def _broken(tensors: dict, kind: str) -> dict:
    """A copy of a two-module LoRA with one defect in module Q (issue 17, item 6)."""
    t = {k: v.clone() for k, v in tensors.items()}
    up, down = f"{Q}.lora_up.weight", f"{Q}.lora_down.weight"
    if kind == "nan":
        t[up][0, 0] = float("nan")
    elif kind == "inf":
        t[up][:] = float("inf")
    elif kind == "bool":
        t[up] = t[up] > 0
    elif kind == "int":
        t[down] = (t[down] * 10).int()
    elif kind == "alpha 0":
        t[f"{Q}.alpha"] = torch.tensor(0.0)
    elif kind == "alpha < 0":
        t[f"{Q}.alpha"] = torch.tensor(-4.0)
    return t


@pytest.mark.parametrize("kind", ["nan", "inf", "bool", "int", "alpha 0", "alpha < 0"])
def test_every_lora_reader_refuses_bad_values_naming_the_module(
    cli, tmp_path: Path, synth, kind: str
) -> None:
    good = {
        **synth.lora(Q, 320, 320, 4, alpha=2),
        **synth.lora(K, 320, 320, 4, alpha=2, seed=1),
    }
    meta = {"ss_base_model_version": "sd_v1"}
    ok = synth.save(tmp_path / "good.safetensors", good, meta)
    bad = synth.save(tmp_path / "bad.safetensors", _broken(good, kind), meta)
    checked = cli("check", bad)
    assert checked.code == 1 and Q in checked.out
    resized = cli("resize", bad, "--rank", "2", "-o", tmp_path / "r.safetensors")
    merged = cli("merge", "--lora", bad, "--lora", ok, "-o", tmp_path / "m.safetensors")
    for result in (resized, merged):
        assert result.code == 2 and Q in result.err and "Traceback" not in result.err
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "m.safetensors").exists()
    from loraforge.errors import LoraFileError
    from loraforge.ops.load_lora import load_lora

    with pytest.raises(LoraFileError, match=Q):  # what network.weights reads a file with
        load_lora(bad)


def test_fp8_files_are_read_and_checked(cli, tmp_path: Path, synth) -> None:
    tensors = {
        **synth.lora(Q, 320, 320, 4, alpha=2, dtype=torch.float8_e4m3fn),
        **synth.lora(K, 320, 320, 4, alpha=2, seed=1, dtype=torch.float8_e4m3fn),
    }
    tensors = {k: v.float() if k.endswith("alpha") else v for k, v in tensors.items()}
    path = synth.save(tmp_path / "fp8.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    assert cli("check", path).code == 0
    assert cli("resize", path, "--rank", "2", "-o", tmp_path / "r.safetensors").code == 0
    broken = dict(tensors)
    broken[f"{Q}.lora_up.weight"] = torch.full((320, 4), float("nan")).to(torch.float8_e4m3fn)
    bad = synth.save(tmp_path / "bad8.safetensors", broken, {"ss_base_model_version": "sd_v1"})
    result = cli("check", bad)
    assert result.code == 1 and "NaN or infinite" in result.out


def test_unknown_module_names_are_reported_by_resize_and_merge(cli, tmp_path: Path, synth) -> None:
    tensors = {
        **synth.lora(Q, 320, 320, 4, alpha=2),
        **synth.lora("lora_unet_no_such_layer", 320, 320, 4, alpha=2, seed=1),
    }
    path = synth.save(tmp_path / "u.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    assert cli("check", path).code == 1
    resized = cli("resize", path, "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert "match no layer" in resized.err and "lora_unet_no_such_layer" in resized.err


def _disk_full(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_resize_and_merge_on_a_full_disk_name_the_path_and_the_free_space(
    cli, lora: Path, tmp_path: Path, monkeypatch
) -> None:
    """Issue 17: a full disk ended in a SafetensorError/RuntimeError traceback."""
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    out = tmp_path / "r.safetensors"
    for result in (
        cli("resize", lora, "--rank", "4", "-o", out),
        cli("merge", "--lora", lora, "--lora", lora, "-o", out),
    ):
        assert result.code == 2, result.err
        assert f"cannot write {out}: the disk is full (" in result.err
        assert "free on that disk" in result.err and "Traceback" not in result.err
    assert not out.exists() and not list(tmp_path.glob(".r.safetensors.*"))
