"""The `xlsparse` command line: compose, info, convert-composable-sft; errors are messages."""
import pytest
import torch

import xlsparse
from xlsparse import cli

transformers = pytest.importorskip("transformers")


def _tiny_bert_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(cfg)
    model.save_pretrained(tmp_path / "base")
    return model


def _diff(model, seed):
    g = torch.Generator().manual_seed(seed)
    w = model.bert.encoder.layer[0].attention.self.query.weight
    idx = torch.randperm(w.numel(), generator=g)[:20].sort().values
    return xlsparse.SparseDiff({"bert.encoder.layer.0.attention.self.query.weight":
                                xlsparse.SparseDelta(idx, torch.randn(20, generator=g), w.shape)})


def test_compose_writes_a_merged_model(tmp_path):
    model = _tiny_bert_dir(tmp_path)
    d1, d2 = _diff(model, 1), _diff(model, 2)
    d1.save(str(tmp_path / "a.safetensors"))
    d2.save_composable_sft(str(tmp_path / "b.bin"))
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), str(tmp_path / "b.bin"),
                     "--alpha", "1.0", "0.5", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.BertForMaskedLM.from_pretrained(tmp_path / "merged")
    with xlsparse.apply([d1, d2], model, alphas=[1.0, 0.5]):
        for (n, p), q in zip(model.named_parameters(), merged.parameters()):
            assert torch.equal(p, q), n


def test_compose_copies_every_file_but_the_weights_and_keeps_the_base(tmp_path, capsys):
    # Only tokenizer*/vocab*/... files were copied: chat_template.jinja, spiece.model and the like were lost.
    model = _tiny_bert_dir(tmp_path)
    base = tmp_path / "base"
    kept = ["chat_template.jinja", "added_tokens.json", "spiece.model", "preprocessor_config.json", "tokenizer.json"]
    for name in [*kept, "tf_model.h5", "flax_model.msgpack", "extra.pt", "tf_model.h5.index.json", "onnx/model.onnx"]:
        (base / name).parent.mkdir(exist_ok=True)
        (base / name).write_text(name)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    assert cli.main(["compose", str(base), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "merged")]) == 0
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "config.json", "model.safetensors"])
    assert all((out / name).read_text() == name for name in kept)
    transformers.BertForMaskedLM.from_pretrained(out)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    assert cli.main(["compose", str(base), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "x/../base")]) == 1
    assert "--out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


def test_info_and_convert(tmp_path, capsys):
    model = _tiny_bert_dir(tmp_path)
    d = _diff(model, 3)
    d.save_composable_sft(str(tmp_path / "sft.bin"))
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft.bin"), str(tmp_path / "out.safetensors")]) == 0
    back = xlsparse.SparseDiff.load(str(tmp_path / "out.safetensors"))
    name = next(iter(d.deltas))
    assert torch.equal(back.deltas[name].indices.long(), d.deltas[name].indices.long())
    assert torch.equal(back.deltas[name].values, d.deltas[name].values)
    assert cli.main(["info", str(tmp_path / "out.safetensors")]) == 0
    out = capsys.readouterr().out
    assert name in out and "| 20 |" in out


def test_info_gives_the_size_of_the_diff_file_not_of_its_folder(tmp_path, capsys):
    # a composable-sft folder with a 2 MiB checkpoint beside pytorch_diff.bin was reported as 2.00 MiB on disk
    model = _tiny_bert_dir(tmp_path)
    folder = tmp_path / "sft"
    folder.mkdir()
    _diff(model, 3).save_composable_sft(str(folder))
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "optimizer.pt").write_bytes(b"0" * 2**21)
    assert cli.main(["info", str(folder)]) == 0
    mib = (folder / "pytorch_diff.bin").stat().st_size / 2**20
    assert f"{folder}: {mib:.2f} MiB on disk" in capsys.readouterr().out


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xlsparse info: error:") and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["compose", "--help"])


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*"))


@pytest.mark.parametrize("argv, name", [(["{tmp}/no_such_base", "{diff}", "--out", "{tmp}/new"], "BASE_DIR"),
                                        (["{base}", "{diff}", "--out", "{tmp}/afile"], "--out"),
                                        (["{base}", "{diff}", "--out", "{tmp}/afile/sub"], "--out"),
                                        (["{base}", "{diff}", "--out", "{tmp}/used"], "--out"),
                                        (["{base}", "{diff}", "--out", ""], "--out: an empty path"),
                                        (["{base}", "{tmp}/not_a_diff", "--out", "{tmp}/new"], "pytorch_diff.bin"),
                                        (["{base}", "{diff}", "--model-class", "AutoConfig", "--out", "{tmp}/new"],
                                         "--model-class"),
                                        (["{base}", "{diff}", "--model-class", "PreTrainedModel", "--out", "{tmp}/new"],
                                         "--model-class"),
                                        # an unset shell variable: the config's class was used, exit 0
                                        (["{base}", "{diff}", "--model-class", "", "--out", "{tmp}/new"],
                                         "--model-class: '' is not")])
def test_compose_checks_arguments_before_writing(argv, name, tmp_path, capsys):
    # A missing BASE_DIR was reported as a huggingface.co connection error; --out as a file or a
    # non-empty folder (another model's files stayed) and a DIFF folder without pytorch_diff.bin
    # failed late or with "No such device (os error 19)"; none named the argument.
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    (tmp_path / "afile").write_text("keep")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "tokenizer.json").write_text("{}")
    (tmp_path / "not_a_diff").mkdir()
    before = _listing(tmp_path)
    argv = [a.format(tmp=tmp_path, base=tmp_path / "base", diff=tmp_path / "a.safetensors") for a in argv]
    assert cli.main(["compose", *argv]) == 1
    assert name in capsys.readouterr().err
    assert _listing(tmp_path) == before
    assert (tmp_path / "afile").read_text() == "keep"


@pytest.mark.parametrize("alpha, message", [("nan", "--alpha: [nan] are not finite"),
                                            ("0.5", "--alpha: {diff} has absolute entries")])
def test_compose_checks_alphas_before_loading_the_base(alpha, message, tmp_path, capsys, monkeypatch):
    """A bad --alpha (not finite, or a scale on a diff with absolute entries that --no-abs does not
    drop) is refused by name before the base model loads; it was told after, as apply's alphas[0]."""
    model = _tiny_bert_dir(tmp_path)
    diff = _diff(model, 1)
    diff.absolute["cls.predictions.bias"] = torch.zeros(50)
    diff.save(str(tmp_path / "a.safetensors"))

    def no_load(*args, **kwargs):
        raise AssertionError("the base model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_load)
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--alpha", alpha, "--out", str(tmp_path / "new")]
    assert cli.main(argv) == 1
    assert message.format(diff=tmp_path / "a.safetensors") in capsys.readouterr().err
    monkeypatch.undo()
    if alpha == "0.5":  # dropping the absolute entries makes the scale valid
        assert cli.main([*argv, "--no-abs"]) == 0


def test_compose_takes_alphas_given_in_two_flags_as_one_list(tmp_path, capsys):
    # argparse kept only the last --alpha's values: "--alpha 0.5 --alpha 2" composed one diff at 2
    _tiny_bert_dir(tmp_path)
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--alpha", "0.5", "--alpha", "2",
            "--out", str(tmp_path / "new")]
    assert cli.main(argv) == 1
    assert "--alpha: 2 values for 1 diffs" in capsys.readouterr().err


def test_compose_refuses_a_diff_given_twice(tmp_path, capsys):
    # a.safetensors and ./a.safetensors are one diff: it was added twice, silently (2x its change)
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    twice = f"{tmp_path}/./a.safetensors"
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), twice, "--out", str(tmp_path / "new")]
    assert cli.main(argv) == 1
    assert "given more than once" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_convert_refuses_an_out_in_a_missing_folder_by_name_before_loading(tmp_path, capsys, monkeypatch):
    # check_output let a missing folder pass; the whole composable-sft file was loaded first and
    # the save then failed with a bare "[Errno 2] No such file or directory"
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 3).save_composable_sft(str(tmp_path / "sft.bin"))
    loads = []
    real = xlsparse.SparseDiff.load_composable_sft
    monkeypatch.setattr(xlsparse.SparseDiff, "load_composable_sft", lambda path: loads.append(path) or real(path))
    out = tmp_path / "new" / "out.safetensors"
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft.bin"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "OUT" in err and "does not exist" in err and not loads and not (tmp_path / "new").exists()


def test_convert_refuses_an_empty_out_by_name_before_loading(tmp_path, capsys, monkeypatch):
    # OUT "" (an unset shell variable) passed the checks: the file was loaded, a temporary file
    # written beside the working folder, and the rename failed as "... .tmp' -> ''"
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 3).save_composable_sft(str(tmp_path / "sft.bin"))
    monkeypatch.setattr(xlsparse.SparseDiff, "load_composable_sft", lambda path: pytest.fail("loaded before the check"))
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft.bin"), ""]) == 1
    assert "OUT: an empty path; give a file" in capsys.readouterr().err


def test_convert_refuses_an_existing_out_and_info_leaves_a_closed_pipe_quietly(tmp_path, capsys):
    import subprocess
    import sys

    model = _tiny_bert_dir(tmp_path)
    d = _diff(model, 3)
    d.save_composable_sft(str(tmp_path / "sft.bin"))
    (tmp_path / "taken.safetensors").write_text("keep")
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft.bin"), str(tmp_path / "taken.safetensors")]) == 1
    assert "OUT" in capsys.readouterr().err and (tmp_path / "taken.safetensors").read_text() == "keep"
    # `xlsparse info DIFF | head`: more rows than a pipe buffer holds, and a reader that leaves.
    w = torch.zeros(3, 2)
    many = xlsparse.SparseDiff({f"layer{i}.weight": xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), w.shape)
                                for i in range(3000)})
    many.save(str(tmp_path / "many.safetensors"))
    proc = subprocess.Popen([sys.executable, "-P", "-c", "import sys; from xlsparse import cli; sys.exit(cli.main())",
                             "info", str(tmp_path / "many.safetensors")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "error" not in err, err


def test_info_names_a_folder_without_a_diff_and_compose_takes_an_empty_out(tmp_path, capsys):
    model = _tiny_bert_dir(tmp_path)
    (tmp_path / "not_a_diff").mkdir()
    assert cli.main(["info", str(tmp_path / "not_a_diff")]) == 1
    assert f"DIFF {tmp_path / 'not_a_diff'}: a folder without pytorch_diff.bin" in capsys.readouterr().err
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    (tmp_path / "empty").mkdir()
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "empty")]) == 0


def test_compose_no_abs_of_matches_the_same_file_by_another_path(tmp_path, monkeypatch):
    # Compared as strings, ./a.safetensors was "not among the DIFF arguments" a.safetensors.
    model = _tiny_bert_dir(tmp_path)
    norm = "bert.embeddings.LayerNorm.weight"
    d = _diff(model, 1)
    d = xlsparse.SparseDiff(d.deltas, absolute={norm: torch.full_like(model.get_parameter(norm), 2.0)})
    d.save(str(tmp_path / "a.safetensors"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compose", "base", "a.safetensors", "--no-abs-of", "./a.safetensors", "--out", "merged"]) == 0
    merged = transformers.BertForMaskedLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.get_parameter(norm), model.get_parameter(norm))  # the absolute entry was skipped
    with xlsparse.apply([d.without_absolute()], model):
        for (n, p), q in zip(model.named_parameters(), merged.parameters()):
            assert torch.equal(p, q), n


def test_diff_save_errors_name_the_destination_not_a_temporary_file(tmp_path, capsys):
    # The atomic write's errors named a random "<OUT>.xxxx.tmp" beside OUT.
    model = _tiny_bert_dir(tmp_path)
    d = _diff(model, 3)
    (tmp_path / "adir").mkdir()
    before = _listing(tmp_path)
    for out in (tmp_path / "adir", tmp_path / "no_dir" / "x.safetensors"):
        with pytest.raises(OSError) as info:
            d.save(str(out))
        assert str(out) in str(info.value) and ".tmp" not in str(info.value)
        assert _listing(tmp_path) == before
    d.save_composable_sft(str(tmp_path / "adir" / "pytorch_diff.bin"))
    for out in (tmp_path / "adir", tmp_path / "no_dir" / "x.safetensors"):
        assert cli.main(["convert-composable-sft", str(tmp_path / "adir"), str(out)]) == 1
        err = capsys.readouterr().err
        assert str(out) in err and ".tmp" not in err
    assert not (tmp_path / "no_dir").exists() and sorted(p.name for p in (tmp_path / "adir").iterdir()) == ["pytorch_diff.bin"]


def test_convert_an_xlsparse_diff_says_so_briefly(tmp_path, capsys):
    # The error listed every tensor key of the file.
    many = xlsparse.SparseDiff({f"p{i}": xlsparse.SparseDelta(torch.tensor([0]), torch.ones(1), (4,))
                                for i in range(200)})
    many.save(str(tmp_path / "x.safetensors"))
    assert cli.main(["convert-composable-sft", str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "not a composable-sft diff" in err and len(err) < 400
    assert not (tmp_path / "y.safetensors").exists()


def test_a_converted_diff_named_bin_reads_back(tmp_path, capsys):
    # convert-composable-sft IN OUT.bin wrote an xlsparse file that info and compose then took for
    # composable-sft's format by its name: "cannot read a composable-sft diff file: Weights only load failed".
    model = _tiny_bert_dir(tmp_path)
    d = _diff(model, 3)
    d.save_composable_sft(str(tmp_path / "sft" / "pytorch_diff.bin"))
    assert cli.main(["convert-composable-sft", str(tmp_path / "sft"), str(tmp_path / "out.bin")]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "out.bin")]) == 0
    assert next(iter(d.deltas)) in capsys.readouterr().out
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "out.bin"), str(tmp_path / "sft"),
                     "--alpha", "1", "-1", "--out", str(tmp_path / "merged")]) == 0
    merged = transformers.BertForMaskedLM.from_pretrained(tmp_path / "merged")
    for (n, p), q in zip(model.named_parameters(), merged.parameters()):
        assert torch.equal(p, q), n  # d - d on the same entries: the base again


@pytest.mark.parametrize("argv, name", [(["convert-composable-sft", "{tmp}/missing.bin", "{tmp}/out.safetensors"], "IN"),
                                        (["info", "{tmp}/missing.safetensors"], "DIFF"),
                                        (["compose", "{tmp}/base", "{tmp}/missing.bin", "--out", "{tmp}/new"], "DIFF")])
def test_a_missing_diff_is_named_by_its_argument(argv, name, tmp_path, capsys):
    # convert-composable-sft said "cannot read a composable-sft diff file: [Errno 2] ...", naming no argument.
    _tiny_bert_dir(tmp_path)
    before = _listing(tmp_path)
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 1
    assert f"{name} {tmp_path}/missing" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_compose_refuses_a_converted_models_folder_as_base(tmp_path, capsys):
    # A converted model's save_pretrained (a Trainer checkpoint) holds whole-model files beside the
    # xlsparse ones: compose loaded the base weights, dropped the trained deltas without a word,
    # wrote base + DIFF, and copied xlsparse_config.json into OUT without its diff.
    import copy

    from xlsparse import hf

    model = _tiny_bert_dir(tmp_path)
    trained = hf.convert(copy.deepcopy(model), density=0.2)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "delta_values" in n:
                p.normal_()
    trained.save_pretrained(tmp_path / "ckpt")
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    before = _listing(tmp_path)
    assert cli.main(["compose", str(tmp_path / "ckpt"), str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "out")]) == 1
    assert f"BASE_DIR {tmp_path / 'ckpt'}: holds xlsparse_config.json" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_compose_refuses_a_routed_models_shared_file_without_a_language(tmp_path, capsys):
    # A 'multi' model's xlsparse_diff.safetensors holds its saved modules only; each language's
    # deltas are in xlsparse_diff.lang<i>.safetensors. Given alone, OUT was the base, with no language.
    import copy

    from xlsparse import hf

    model = _tiny_bert_dir(tmp_path)
    routed = hf.convert(copy.deepcopy(model), kind="multi", diffs={"de": _diff(model, 1), "fr": _diff(model, 2)})
    hf.save_pretrained(routed, str(tmp_path / "routed"))
    shared, fr = (tmp_path / "routed" / f"xlsparse_diff{part}.safetensors" for part in ("", ".lang1"))
    before = _listing(tmp_path)
    assert cli.main(["compose", str(tmp_path / "base"), str(shared), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"DIFF {shared}: the shared entries of a routed ('multi') model" in err
    assert "xlsparse_diff.lang0.safetensors (de), xlsparse_diff.lang1.safetensors (fr)" in err
    assert _listing(tmp_path) == before
    assert cli.main(["compose", str(tmp_path / "base"), str(shared), str(fr), "--out", str(tmp_path / "out")]) == 0
    got = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").state_dict()
    want = copy.deepcopy(model)
    xlsparse.apply(_diff(model, 2), want)  # French: base + its deltas, computed in Python
    for n, t in want.state_dict().items():
        assert torch.equal(got[n], t), n


@pytest.mark.parametrize("out_exists", [False, True, "nested"])
def test_compose_leaves_no_half_written_out(out_exists, tmp_path, capsys, monkeypatch):
    # A save that failed half way (a full disk) left the copied files and a partial model in OUT;
    # an OUT in folders that did not exist left those folders behind.
    from pathlib import Path

    model = _tiny_bert_dir(tmp_path)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    if out_exists is True:
        (tmp_path / "out").mkdir()
    out = tmp_path / "new" / "deeper" / "out" if out_exists == "nested" else tmp_path / "out"
    before = _listing(tmp_path)

    def full_disk(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        (Path(folder) / "shards").mkdir()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.BertForMaskedLM, "save_pretrained", full_disk)
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--out", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_made_folder_removes_what_a_failed_block_added_to_a_folder_that_existed(tmp_path):
    # compose cleared an existing OUT by hand beside made_folder, which removed only the folders it made
    from xlsparse._paths import made_folder

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.txt").write_text("kept")
    before = _listing(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        with made_folder(str(tmp_path / "out"), undo_added=True) as made:
            assert made is None
            (tmp_path / "out" / "model.safetensors").write_bytes(b"partial")
            (tmp_path / "out" / "shards").mkdir()
            (tmp_path / "out" / "shards" / "1.bin").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert _listing(tmp_path) == before and (tmp_path / "out" / "earlier.txt").read_text() == "kept"


def test_compose_refuses_a_model_class_whose_head_nothing_gives(tmp_path, capsys):
    # BertForTokenClassification on a masked-LM base: its classifier was drawn at random, another
    # one each run, and compose wrote it with exit 0.
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--model-class",
            "BertForTokenClassification"]
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 1
    assert "classifier.weight" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # a diff that carries the head makes it whole
    head = transformers.BertForTokenClassification(model.config)
    with_head = xlsparse.SparseDiff({**_diff(model, 1).deltas}, absolute={
        "classifier.weight": head.classifier.weight.detach().clone(), "classifier.bias": head.classifier.bias.detach().clone()})
    with_head.save(str(tmp_path / "b.safetensors"))
    argv[2] = str(tmp_path / "b.safetensors")
    assert cli.main(argv + ["--out", str(tmp_path / "out")]) == 0
    out = transformers.BertForTokenClassification.from_pretrained(tmp_path / "out")
    assert torch.equal(out.classifier.weight, head.classifier.weight)


def test_compose_checks_the_base_of_a_diff_saved_by_hf_save_pretrained(tmp_path, capsys):
    # hf.from_pretrained refuses a base whose weights differ from the fingerprints save_pretrained
    # recorded; compose wrote that file's diff onto another checkpoint of the same shapes silently.
    import copy

    from xlsparse import hf

    model = _tiny_bert_dir(tmp_path)
    torch.manual_seed(1)
    transformers.BertForMaskedLM(model.config).save_pretrained(tmp_path / "other")
    trained = hf.convert(copy.deepcopy(model), density=0.2)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "delta_values" in n:
                p.normal_()
    hf.save_pretrained(trained, str(tmp_path / "sft"))
    diff = tmp_path / "sft" / "xlsparse_diff.safetensors"
    before = _listing(tmp_path)
    assert cli.main(["compose", str(tmp_path / "other"), str(diff), "--out", str(tmp_path / "out")]) == 1
    assert f"DIFF {diff}: " in capsys.readouterr().err
    assert _listing(tmp_path) == before
    assert cli.main(["compose", str(tmp_path / "base"), str(diff), "--out", str(tmp_path / "out")]) == 0
    got = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out").state_dict()
    want = copy.deepcopy(model)
    xlsparse.apply(xlsparse.SparseDiff.load(str(diff)), want)
    for n, t in want.state_dict().items():
        assert torch.equal(got[n], t), n


def test_compose_refuses_a_routed_models_language_without_its_trained_modules(tmp_path, capsys):
    # Every language of a routed model runs with its modules_to_save, kept in xlsparse_diff.safetensors:
    # a language's file alone was composed with the base's classifier in place of the trained one.
    import copy

    from xlsparse import hf

    model = _tiny_bert_dir(tmp_path)
    routed = hf.convert(copy.deepcopy(model), kind="multi", diffs={"de": _diff(model, 1), "fr": _diff(model, 2)},
                        modules_to_save=["cls.predictions.transform"])
    with torch.no_grad():
        routed.cls.predictions.transform.dense.weight.add_(1.0)
    hf.save_pretrained(routed, str(tmp_path / "routed"))
    shared, fr = (tmp_path / "routed" / f"xlsparse_diff{part}.safetensors" for part in ("", ".lang1"))
    before = _listing(tmp_path)
    assert cli.main(["compose", str(tmp_path / "base"), str(fr), "--out", str(tmp_path / "out")]) == 1
    assert f"DIFF {fr}: one language's deltas of a routed ('multi') model" in capsys.readouterr().err
    assert _listing(tmp_path) == before
    for extra, trained in (([], True), (["--no-abs-of", str(shared)], False)):
        out = tmp_path / f"out{trained}"
        assert cli.main(["compose", str(tmp_path / "base"), str(fr), str(shared), *extra, "--out", str(out)]) == 0
        got = transformers.BertForMaskedLM.from_pretrained(out).state_dict()
        want = copy.deepcopy(model)
        xlsparse.apply(_diff(model, 2), want)  # French: base + its deltas, computed in Python
        if trained:  # + the trained module, replacing the base's
            want.cls.predictions.transform.dense.weight.data.add_(1.0)
        for n, t in want.state_dict().items():
            assert torch.equal(got[n], t), n


def test_a_folder_without_pytorch_diff_bin_names_the_diff_files_it_holds(tmp_path, capsys):
    # `xlsparse info DIR` on hf.save_pretrained's folder (or a model folder) said only that it held
    # no pytorch_diff.bin, as if the diff were missing
    import copy

    from xlsparse import hf

    model = _tiny_bert_dir(tmp_path)
    hf.save_pretrained(hf.convert(copy.deepcopy(model), density=0.2), str(tmp_path / "sft"))
    assert cli.main(["info", str(tmp_path / "sft")]) == 1
    assert f"it holds the xlsparse diff files {tmp_path / 'sft' / 'xlsparse_diff.safetensors'}" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path / "sft" / "xlsparse_diff.safetensors")]) == 0
    capsys.readouterr()
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "base"), "--out", str(tmp_path / "out")]) == 1
    assert "it is a model folder (config.json), not a diff" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_key_error_prints_its_message_without_quotes(tmp_path, capsys, monkeypatch):
    # a DIFF naming a parameter the model lacks printed error: "apply: diff 0: ... named 'x'" (the KeyError's repr)
    _tiny_bert_dir(tmp_path)
    xlsparse.SparseDiff({"bert.nope.weight": xlsparse.SparseDelta(torch.tensor([0]), torch.ones(1), (2, 2))}).save(
        str(tmp_path / "d.safetensors"))
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"error: DIFF {tmp_path / 'd.safetensors'}: changes ['bert.nope.weight'], which BertForMaskedLM has not" in err
    assert not (tmp_path / "out").exists()
    # compose names such a DIFF itself now; apply's KeyError still reaches main from other callers

    def key_error(*args, **kwargs):
        raise KeyError("apply: diff 0: the model has no parameter or buffer named 'bert.nope.weight'")

    monkeypatch.setattr(xlsparse, "apply", key_error)
    monkeypatch.setattr(xlsparse.diff, "_named_tensors", lambda model: {"bert.nope.weight": None})
    assert cli.main(["compose", str(tmp_path / "base"), str(tmp_path / "d.safetensors"), "--out", str(tmp_path / "out")]) == 1
    assert "error: apply: diff 0: the model has no parameter or buffer named 'bert.nope.weight'\n" in capsys.readouterr().err


def test_compose_names_the_diff_whose_entries_the_model_class_lacks(tmp_path, capsys):
    # apply's error said "apply: diff 0: the model has no parameter or buffer named 'cls.predictions.bias'":
    # neither the DIFF nor --no-abs-of, which composes a language SFT's MLM head out of a task model.
    model = _tiny_bert_dir(tmp_path)
    w = model.bert.encoder.layer[0].attention.self.query.weight
    head = xlsparse.SparseDiff({}, absolute={"classifier.weight": torch.ones(3, 16)})
    head.save(str(tmp_path / "head.safetensors"))
    other = xlsparse.SparseDiff({"encoder.layer.0.attention.self.query.weight":  # a BertModel's name
                                 xlsparse.SparseDelta(torch.tensor([0, 5]), torch.ones(2), w.shape)})
    other.save(str(tmp_path / "other.safetensors"))
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "head.safetensors"), "--out", str(tmp_path / "new")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"DIFF {tmp_path / 'head.safetensors'}" in err and "--no-abs-of" in err and "classifier.weight" in err
    assert not (tmp_path / "new").exists()
    assert cli.main([*argv, "--no-abs-of", str(tmp_path / "head.safetensors")]) == 0  # the head left out
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "new2")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"DIFF {tmp_path / 'other.safetensors'}" in err and "--model-class" in err
    assert not (tmp_path / "new2").exists()


def test_compose_refuses_num_labels_that_size_no_head(tmp_path, capsys):
    # --num-labels 5 onto a masked LM without --model-class: exit 0, a masked LM whose config.json said 5 labels
    model = _tiny_bert_dir(tmp_path)
    _diff(model, 1).save(str(tmp_path / "a.safetensors"))
    argv = ["compose", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--num-labels", "5"]
    assert cli.main([*argv, "--out", str(tmp_path / "new")]) == 1
    assert "--num-labels 5: BertForMaskedLM loads every weight" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a base whose classifier has 5 labels already: the option agrees with it
    transformers.BertForSequenceClassification(model.config.__class__(**{**model.config.to_dict(), "num_labels": 5})) \
        .save_pretrained(tmp_path / "cls5")
    argv[1] = str(tmp_path / "cls5")
    assert cli.main([*argv, "--out", str(tmp_path / "new5")]) == 0
    assert transformers.AutoConfig.from_pretrained(tmp_path / "new5").num_labels == 5
