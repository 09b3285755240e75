"""`zipmoe convert|inspect|verify|bench` via the dispatcher: happy paths, help, bad input, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.convert.synthetic import write_checkpoint

from zipmoe.cli import main as cli_main
from zipmoe.cli.main import build_parser, main


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "ckpt", layers=2, experts=4)


@pytest.fixture(scope="module")
def store(hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "store"
    assert main(["convert", str(hf), str(out), "--no-progress", "--threads", "2", "--shards", "2"]) == 0
    return out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("convert", "inspect", "verify", "bench"):
        assert f"    {name} " in out


@pytest.mark.parametrize("command", ["convert", "inspect", "verify", "bench"])
def test_every_flag_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        flag = action.option_strings or action.dest
        assert action.help and action.help.strip(), f"{command}: {flag} has no help"
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "--debug" in capsys.readouterr().out


def test_convert_prints_store_and_verify_inspect_succeed(store: Path, hf: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert (store / "zipmoe.json").is_file() and (store / "tokenizer_config.json").is_file()
    assert main(["verify", str(store), "--against", str(hf), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK ") and "Bit-identical" in out and "8 experts" in out
    assert main(["inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["codec"]["id"] == "huffman" and report["experts"] == 8
    assert report["total"]["ratio"] >= 0.99 * report["total"]["floor_ratio"]
    assert main(["inspect", str(store), "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[:2] == ["all", "all"]
    assert any(line.split()[:2] == ["1", "down"] for line in table)


def test_user_error_is_one_paragraph_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and "\n\n" not in err.strip()
    assert main(["--debug", "convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--coder", "nosuch"], "unknown exponent codec 'nosuch'"),
    (["--coder-param", "level"], "KEY=VALUE"),
    (["--coder", "zstd", "--coder-param", "colour=3"], "bad parameters"),
])
def test_bad_coder_arguments(args: list[str], message: str, hf: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(hf), str(tmp_path / "out"), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err


def test_existing_destination_needs_overwrite(store: Path, hf: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(hf), str(store), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_flag_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["convert", "a", "b", "--threads", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_verify_corrupt_store_exits_2(store: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    data = bytearray((bad / "experts.bin").read_bytes())
    data[10] ^= 1
    (bad / "experts.bin").write_bytes(bytes(data))
    assert main(["verify", str(bad), "--no-progress"]) == 2
    assert "layer 0 expert 0 SM plane" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import zipmoe.cli.inspect as inspect_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cli, "run", interrupted)
    assert main(["inspect", "somewhere"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_unknown_bench_suite(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nosuch"]) == 2
    assert "unknown benchmark suite 'nosuch'" in capsys.readouterr().err


def test_only_the_chosen_command_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    imported = []
    real = cli_main.importlib.import_module
    monkeypatch.setattr(cli_main.importlib, "import_module", lambda name: imported.append(name) or real(name))
    build_parser(["inspect", "x"])
    assert imported == ["zipmoe.cli.inspect"]


def test_console_script(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("zipmoe")
    if not exe.exists():
        pytest.skip("zipmoe console script not installed in this environment")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(exe), "verify", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("zipmoe: error (StoreIncompleteError)") and "zipmoe convert" in proc.stderr
