"""A user's path with PEFT's semantics: convert freezes the rest, modules_to_save, save/reload
bit-exactly, merge_and_unload through transformers' own save/load, disable, tied weights, safe
routing (ids, names, the batch field, the Trainer) and autocast, on tiny BERT, XLM-R, Llama and GPT-2."""
import contextlib
import copy
import inspect
import json
import os
import re
import warnings

import pytest
import torch
from tiny_models import ARCHS, VOCAB, batch, random_diff, tiny

import xlsparse
from xlsparse import hf
from xlsparse.nn import MultiDeltaLinear, SparseDeltaLinear, SubnetworkLinear

transformers = pytest.importorskip("transformers")


def classifier(arch: str, seed: int = 0, num_labels: int = 3):
    """A tiny sequence classifier (head: `classifier` or `score`) and the head's module name."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=num_labels, pad_token_id=0)
    if arch == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                      max_position_embeddings=32, **common)
        return transformers.BertForSequenceClassification(cfg).eval(), "classifier"
    if arch == "xlmr":
        cfg = transformers.XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=48, max_position_embeddings=40, **common)
        return transformers.XLMRobertaForSequenceClassification(cfg).eval(), "classifier"
    if arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=48, max_position_embeddings=32, **common)
        return transformers.LlamaForSequenceClassification(cfg).eval(), "score"
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, **common)
    return transformers.GPT2ForSequenceClassification(cfg).eval(), "score"


def _train(model, steps=3, seed=5):
    """A few AdamW steps over exactly the parameters that require grad (what a user's optimizer sees)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, VOCAB, (4, 6), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def _bits(t):
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_freezes_everything_but_deltas_and_modules_to_save(arch):
    model, head = classifier(arch)
    hf.convert(model, density=0.1, modules_to_save=[head])
    for name, p in model.named_parameters():
        expect = "delta_values" in name or name.startswith(head + ".")
        assert p.requires_grad == expect, name
    trainable, total = hf.model.trainable_parameters(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_print_trainable_parameters_in_peft_format(capsys):
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    hf.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = sum(p.numel() for p in model.parameters())
    assert line == f"trainable params: {n:,} || all params: {m:,} || trainable%: {100 * n / m:.4f}"


@pytest.mark.parametrize("arch", ARCHS)
def test_train_save_reload_merge_unload_round_trip(arch, tmp_path):
    model, head = classifier(arch)
    hf.convert(model, density=0.1, modules_to_save=[head])
    _train(model)
    ids = batch(3, 7)
    trained = model(input_ids=ids).logits

    hf.save_pretrained(model, tmp_path / "sft")
    files = sorted(os.listdir(tmp_path / "sft"))
    assert files == ["xlsparse_config.json", "xlsparse_diff.safetensors"]
    config = json.loads((tmp_path / "sft" / "xlsparse_config.json").read_text())
    assert set(config) == {"kind", "target_modules", "density", "k", "languages", "modules_to_save", "keep_tied",
                           "base_model", "xlsparse_version", "target_request", "base_fingerprint", "model_class"}
    assert config["modules_to_save"] == [head] and config["kind"] == "delta"
    # no base weight in the file: its bytes are the deltas plus the head
    diff = xlsparse.SparseDiff.load(str(tmp_path / "sft" / "xlsparse_diff.safetensors"))
    assert set(diff.absolute) == {n for n, _ in model.named_parameters() if n.startswith(head + ".")}
    assert not diff.dense

    fresh, _ = classifier(arch)
    reloaded = hf.from_pretrained(fresh, tmp_path / "sft")
    assert torch.equal(_bits(reloaded(input_ids=ids).logits), _bits(trained))
    trains = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert trains == {n for n, p in model.named_parameters() if p.requires_grad}  # it trains on, as converted
    frozen = hf.from_pretrained(classifier(arch)[0].train(), tmp_path / "sft", is_trainable=False)  # PEFT's default
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(_bits(frozen(input_ids=ids).logits), _bits(trained))

    # a file with an entry the layer cannot take (a dense one, made by hand) is refused, not half loaded
    name = next(iter(diff.deltas))
    hand = xlsparse.SparseDiff._trusted({n: d for n, d in diff.deltas.items() if n != name},
                                        {name: diff.deltas[name].to_dense()}, diff.absolute)
    (tmp_path / "hand").mkdir()
    (tmp_path / "hand" / "xlsparse_config.json").write_text((tmp_path / "sft" / "xlsparse_config.json").read_text())
    hand.save(str(tmp_path / "hand" / "xlsparse_diff.safetensors"))
    with pytest.raises(ValueError, match="does not take"):
        hf.from_pretrained(classifier(arch)[0], tmp_path / "hand")

    # extract_diff + apply on a fresh, unconverted base equals the trained model
    base, _ = classifier(arch)
    with xlsparse.apply([hf.extract_diff(model)], base):
        torch.testing.assert_close(base(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)

    plain = hf.merge_and_unload(model)
    assert not any(isinstance(m, (SparseDeltaLinear, MultiDeltaLinear, SubnetworkLinear)) for m in plain.modules())
    conv1d = transformers.pytorch_utils.Conv1D
    if arch == "gpt2":
        assert isinstance(plain.transformer.h[0].attn.c_attn, conv1d)
    torch.testing.assert_close(plain(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = type(plain).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_a_reload_keeps_the_saved_budget_and_the_model_s_own_name(tmp_path):
    model, head = classifier("bert")
    model.config._name_or_path = "org/model-a"
    hf.convert(model, k=50, modules_to_save=[head])
    hf.save_pretrained(model, tmp_path / "a")
    other, _ = classifier("bert")
    other.config._name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match="trained from 'org/model-a'"):
        hf.from_pretrained(other, tmp_path / "a")
    assert (other.xlsparse_config.base_model, other.xlsparse_config.k) == ("org/model-b", 50)
    hf.save_pretrained(other, tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "xlsparse_config.json").read_text())
    assert (saved["k"], saved["base_model"]) == (50, "org/model-b")


def test_a_reload_of_saved_modules_onto_another_model_class_is_warned_of(tmp_path):
    # a sequence classifier's trained `classifier` fits a token classifier's module of the same name and
    # shape, and loaded into it silently: the head now scores every token
    model, head = classifier("bert")
    hf.convert(model, k=50, modules_to_save=[head])
    _train(model)
    hf.save_pretrained(model, tmp_path / "seq")
    assert json.loads((tmp_path / "seq" / "xlsparse_config.json").read_text())["model_class"] == \
        "BertForSequenceClassification"
    base = classifier("bert")[0]
    tokens = transformers.BertForTokenClassification(base.config).eval()
    tokens.load_state_dict(base.state_dict(), strict=False)  # the same body and head shapes and base weights
    with pytest.warns(UserWarning, match="saved BertForSequenceClassification's modules \\['classifier'\\], loaded "
                                         "here into a BertForTokenClassification"):
        hf.from_pretrained(tokens, tmp_path / "seq")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same class: no word
        hf.from_pretrained(classifier("bert")[0], tmp_path / "seq")
        # a diff without saved modules (a language SFT) goes onto another class's body as it is
        lm = transformers.BertForMaskedLM(base.config).eval()
        lm.load_state_dict(base.state_dict(), strict=False)
        hf.convert(lm, k=50)
        with torch.no_grad():  # a trained delta
            for p in lm.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        hf.save_pretrained(lm, tmp_path / "lm")
        hf.from_pretrained(classifier("bert")[0], tmp_path / "lm")


def _deeper_bert(layers: int = 4):
    """tiny("bert") with more layers: the first two named alike and holding the same weights."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32)
    deep = transformers.BertForMaskedLM(cfg).eval()
    deep.load_state_dict(tiny("bert").state_dict(), strict=False)
    return deep


@pytest.mark.parametrize("targets", [None, ["query", "value"], r".*\.output\.dense"])
def test_a_reload_onto_a_deeper_base_is_refused(targets, tmp_path):
    # the config held the resolved names only: a 4-layer base took the deltas on layers 0-1 and
    # ran layers 2-3 without any, no error, no warning
    model = hf.convert(tiny("bert"), target_modules=targets, density=0.1)
    hf.save_pretrained(model, tmp_path / "sft")
    deep = _deeper_bert()
    with pytest.raises(ValueError, match="selected 2 layers there and 4|selected 4 layers there and 8|selected 12 "
                                         "layers there and 24"):
        hf.from_pretrained(deep, tmp_path / "sft")
    assert getattr(deep, "xlsparse_config", None) is None  # nothing changed
    # the same request on the same depth loads, and a re-save keeps the request, not the names
    again = hf.from_pretrained(tiny("bert"), tmp_path / "sft")
    hf.save_pretrained(again, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "xlsparse_config.json").read_text())["target_request"] == {
        "target_modules": targets}
    # target_modules given as a generator is recorded whole (it was read once, by target_names)
    once = hf.convert(tiny("bert"), target_modules=(t for t in ["query", "value"]), density=0.1)
    assert once.xlsparse_config.target_request == {"target_modules": ["query", "value"]}
    # a converted base is named as such (the request's check said it had no linear layer)
    with pytest.raises(ValueError, match="converted already"):
        hf.from_pretrained(hf.convert(tiny("bert"), density=0.1), tmp_path / "sft")
    # the user converted only some layers: the exact names are the request, and a deeper base fits it
    some = hf.convert(tiny("bert"), target_modules=["bert.encoder.layer.0.attention.self.query"], density=0.1)
    hf.save_pretrained(some, tmp_path / "some")
    hf.from_pretrained(_deeper_bert(), tmp_path / "some")


def test_a_reload_converts_the_recorded_layers_exactly(tmp_path):
    # the recorded names were given to convert as a list, whose entries match as dotted suffixes: a
    # regex request that selected `layers.0.fc` reloaded `extra.layers.0.fc` converted too (an empty
    # delta), and the next save of that model named both, which the request then refused to reload
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.ModuleList([Block()])
            self.extra = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([Block()])})

        def forward(self, x):
            return self.extra["layers"][0](self.layers[0](x))

    model = hf.convert(Model(), r"layers\.0\.fc", density=0.5)
    assert model.xlsparse_config.target_modules == ["layers.0.fc"]
    torch.nn.init.normal_(model.layers[0].fc.delta_values)
    hf.save_pretrained(model, tmp_path / "a")
    again = hf.from_pretrained(Model(), tmp_path / "a")
    assert again.xlsparse_config.target_modules == ["layers.0.fc"]
    assert type(again.extra["layers"][0].fc) is torch.nn.Linear
    assert again.xlsparse_config.target_request == {"target_modules": r"layers\.0\.fc"}
    hf.save_pretrained(again, tmp_path / "b")
    x = torch.randn(3, 4)
    assert torch.equal(hf.from_pretrained(Model(), tmp_path / "b")(x), model(x))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_reload_onto_a_base_with_other_weights_is_refused(arch, tmp_path):
    # from_pretrained checked the base's name only: a same-shape base with other weights took the
    # deltas silently (tiny BERT seed 1 under a seed-0 save: logits 0.59 off)
    model = hf.convert(tiny(arch), density=0.1)
    with torch.no_grad():
        for _, layer in hf.model._converted(model):
            layer.delta_values.normal_()
    ids = batch()
    trained = model(input_ids=ids).logits
    hf.save_pretrained(model, tmp_path / "sft")
    other = tiny(arch, seed=1)
    with pytest.raises(ValueError, match=r"differs from the one .* was trained on \(sampled entry"):
        hf.from_pretrained(other, tmp_path / "sft")
    assert getattr(other, "xlsparse_config", None) is None
    # one weight moved by a sparse update (an SFT applied to the base): the sums tell
    near = tiny(arch)
    name = hf.model.target_names(near)[-1]
    with torch.no_grad():
        near.get_submodule(name).weight.view(-1)[1::7] += 1e-3
    with pytest.raises(ValueError, match=f"{name}.weight .* differs"):
        hf.from_pretrained(near, tmp_path / "sft")
    if arch == "gpt2":  # a square Conv1D weight transposed (the layout a save could get wrong)
        flipped = tiny(arch)
        with torch.no_grad():
            w = flipped.transformer.h[1].attn.c_proj.weight
            w.copy_(w.t().clone())
        with pytest.raises(ValueError, match="h.1.attn.c_proj.weight .* differs"):
            hf.from_pretrained(flipped, tmp_path / "sft")
    # the right base loads bit for bit; one cast to bf16 or fp16 loads too, within its rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = hf.from_pretrained(tiny(arch), tmp_path / "sft")
    assert torch.equal(same(input_ids=ids).logits, trained)
    for dtype in (torch.bfloat16, torch.float16):
        hf.from_pretrained(tiny(arch).to(dtype), tmp_path / "sft")
    # a save in bf16 loads onto the fp32 base it was cast from
    low = hf.convert(tiny(arch).to(torch.bfloat16), density=0.1)
    hf.save_pretrained(low, tmp_path / "bf16")
    hf.from_pretrained(tiny(arch), tmp_path / "bf16")
    # a merged model records its base, not W0 + delta
    hf.merge(model)
    hf.save_pretrained(model, tmp_path / "merged")
    hf.from_pretrained(tiny(arch), tmp_path / "merged")
    # a save written before the fingerprints were recorded still loads, with one warning
    config = json.loads((tmp_path / "sft" / "xlsparse_config.json").read_text())
    del config["base_fingerprint"]
    (tmp_path / "sft" / "xlsparse_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="cannot be checked") as caught:
        older = hf.from_pretrained(tiny(arch), tmp_path / "sft")
    assert len([w for w in caught if "fingerprint" in str(w.message)]) == 1
    assert torch.equal(older(input_ids=ids).logits, trained)


def test_a_reload_checks_the_base_weights_outside_the_targets(tmp_path):
    # only the converted weights were fingerprinted: a head drawn at random when the base is built
    # (not in modules_to_save, so frozen and never saved) and a base of another vocabulary size
    # (embeddings resized before convert) took the deltas silently
    model, _ = classifier("bert")
    hf.convert(model, density=0.1)
    hf.save_pretrained(model, tmp_path / "head")
    rebuilt, _ = classifier("bert")
    torch.nn.init.normal_(rebuilt.classifier.weight)  # as loading a pretrained body draws the new head
    with pytest.raises(ValueError, match=r"classifier\.weight of the base model given differs.*modules_to_save"):
        hf.from_pretrained(rebuilt, tmp_path / "head")
    hf.from_pretrained(classifier("bert")[0], tmp_path / "head")
    resized = tiny("bert")
    resized.resize_token_embeddings(VOCAB + 3)
    hf.convert(resized, density=0.1)
    hf.save_pretrained(resized, tmp_path / "vocab")
    plain = tiny("bert")
    with pytest.raises(ValueError, match=r"word_embeddings\.weight of the base model given differs"):
        hf.from_pretrained(plain, tmp_path / "vocab")
    assert getattr(plain, "xlsparse_config", None) is None
    # a parameter the base lacks cannot change its outputs: an MLM's body deltas load onto a token
    # classifier holding the same body
    mlm = tiny("bert")
    hf.convert(mlm, density=0.1)
    hf.save_pretrained(mlm, tmp_path / "mlm")
    tagger = transformers.BertForTokenClassification(tiny("bert").config).eval()
    tagger.bert.load_state_dict(tiny("bert").bert.state_dict(), strict=False)  # the MLM's body has no pooler
    loaded = hf.from_pretrained(tagger, tmp_path / "mlm")
    ids = batch()
    hidden = loaded.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, mlm.bert(input_ids=ids).last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_reload_checks_a_tied_head_under_its_own_name(arch, tmp_path):
    # the fingerprints were recorded under one name per tensor: GPT-2's tied lm_head under
    # transformer.wte.weight only, so a base whose head is its own (untied and drawn at random) took the
    # deltas silently; and a head trained apart (Llama's) went unchecked on a base that ties it
    model = hf.convert(tiny(arch), density=0.1)
    hf.save_pretrained(model, tmp_path)
    other = tiny(arch)
    if arch == "gpt2":
        other.lm_head.weight = torch.nn.Parameter(torch.randn_like(other.lm_head.weight))
    else:
        other.lm_head.weight = other.model.embed_tokens.weight
    with pytest.raises(ValueError, match=r"lm_head\.weight of the base model given differs"):
        hf.from_pretrained(other, tmp_path)
    assert getattr(other, "xlsparse_config", None) is None
    same = tiny(arch)
    same.lm_head.weight = torch.nn.Parameter(same.lm_head.weight.detach().clone())  # untied, same values
    ids = batch()
    assert torch.equal(hf.from_pretrained(same, tmp_path)(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_model_with_a_parametrized_target_reloads(tmp_path):
    # a weight_norm'ed linear converts and saves, but its weight is computed, not a parameter of
    # that name: the reload's base check raised a bare KeyError
    def base():
        model = tiny("bert")
        torch.nn.utils.parametrizations.weight_norm(model.bert.encoder.layer[0].attention.self.query)
        return model

    model = hf.convert(base(), target_modules=["query"], density=0.2)
    for _, layer in hf.model._converted(model):
        torch.nn.init.normal_(layer.delta_values)
    hf.save_pretrained(model, tmp_path)
    ids = batch()
    assert torch.equal(hf.from_pretrained(base(), tmp_path)(ids).logits, model(ids).logits)
    other = base()
    torch.nn.init.normal_(other.bert.encoder.layer[0].attention.self.query.parametrizations.weight.original1)
    with pytest.raises(ValueError, match=r"layer\.0\.attention\.self\.query\.weight of the base model given differs"):
        hf.from_pretrained(other, tmp_path)


def test_a_multi_reload_checks_the_base_too(tmp_path):
    model = hf.convert(tiny("bert"), kind="multi", diffs={lang: random_diff(tiny("bert"), 7, 0.1, s)
                                                          for s, lang in enumerate(["de", "fr"])})
    hf.save_pretrained(model, tmp_path / "m")
    with pytest.raises(ValueError, match="differs from the one"):
        hf.from_pretrained(tiny("bert", seed=2), tmp_path / "m")
    hf.from_pretrained(tiny("bert"), tmp_path / "m")


def test_a_config_that_names_a_language_twice_is_refused(tmp_path):
    # languages ["de", "de"] (a file made by hand) built a dict with one language: the second
    # language's file was never read
    model = tiny("bert")
    hf.convert(model, kind="multi", diffs={lang: random_diff(tiny("bert"), 7, 0.1, s) for s, lang in enumerate(["de", "fr"])})
    hf.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "xlsparse_config.json").read_text())
    (tmp_path / "m" / "xlsparse_config.json").write_text(json.dumps(dict(config, languages=["de", "de"])))
    fresh = tiny("bert")
    with pytest.raises(ValueError, match="names a language twice"):
        hf.from_pretrained(fresh, tmp_path / "m")
    assert getattr(fresh, "xlsparse_config", None) is None


@pytest.mark.parametrize("listed", [[], ["classifier", "bert.pooler"]])
def test_a_config_and_diff_that_disagree_on_the_saved_modules_are_refused(listed, tmp_path):
    # a config without the head loaded the file's head into a frozen module (it never trained on);
    # one naming a module the file lacks left that module at the base's values, silently
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    hf.save_pretrained(model, tmp_path / "sft")
    config = json.loads((tmp_path / "sft" / "xlsparse_config.json").read_text())
    (tmp_path / "sft" / "xlsparse_config.json").write_text(json.dumps(dict(config, modules_to_save=listed)))
    fresh, _ = classifier("bert")
    with pytest.raises(ValueError, match="do not belong together"):
        hf.from_pretrained(fresh, tmp_path / "sft")
    assert getattr(fresh, "xlsparse_config", None) is None


def _rewrite(path, edit):
    """Load the diff file at `path`, let `edit` change its {name: SparseDelta}, and save it back: a hand-edited file."""
    diff = xlsparse.SparseDiff.load(path)
    deltas = dict(diff.deltas)
    edit(deltas)
    xlsparse.SparseDiff(deltas, absolute=diff.absolute, base_model=diff.base_model).save(path)


def _saved_and_fresh(kind, tmp_path):
    """A tiny BERT converted as `kind`, saved to tmp_path / "m"; its diff file (the first
    language's for 'multi') and an unconverted twin of its base."""
    model = tiny("bert")
    if kind == "delta":
        hf.convert(model, density=0.05)
    else:
        hf.convert(model, kind="multi", diffs={lang: random_diff(tiny("bert"), 7, 0.1, s)
                                               for s, lang in enumerate(["de", "fr"])})
    hf.save_pretrained(model, tmp_path / "m")
    name = "xlsparse_diff.safetensors" if kind == "delta" else "xlsparse_diff.lang0.safetensors"
    return str(tmp_path / "m" / name), tiny("bert")


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_a_diff_file_without_a_target_layer_is_refused(kind, tmp_path):
    # save_pretrained writes every converted layer's delta, an empty one too: a file without one
    # (edited by hand) gave that layer an empty delta, so it ran as the base, silently
    path, fresh = _saved_and_fresh(kind, tmp_path)
    layer = "bert.encoder.layer.1.output.dense.weight"
    _rewrite(path, lambda deltas: deltas.pop(layer))
    with pytest.raises(ValueError, match=re.escape(f"{path} has no delta for {[layer]}")):
        hf.from_pretrained(fresh, tmp_path / "m")
    assert getattr(fresh, "xlsparse_config", None) is None


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_a_diff_file_with_an_edited_shape_is_refused_naming_the_folder(kind, tmp_path):
    # the shape is the file's word alone (indices inside it pass load); only the model can refute it
    path, fresh = _saved_and_fresh(kind, tmp_path)
    layer = "bert.encoder.layer.0.attention.self.query.weight"

    def grow(deltas):
        deltas[layer] = xlsparse.SparseDelta(deltas[layer].indices, deltas[layer].values, (64, 32))

    _rewrite(path, grow)
    assert xlsparse.SparseDiff.load(path).deltas[layer].shape == (64, 32)
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'm'))}.*{layer!r} has shape \\(64, 32\\)"):
        hf.from_pretrained(fresh, tmp_path / "m")
    assert getattr(fresh, "xlsparse_config", None) is None


@pytest.mark.parametrize("folder", ["earlier save", "new"])
def test_a_save_that_fails_half_way_leaves_the_folder_as_it_was(folder, tmp_path, monkeypatch):
    # a 'multi' save writes one file per language and the config last: a full disk at the second
    # language left the new shared file and first language beside the earlier save's second
    # language and config, which from_pretrained loaded as one model, silently; then the failed
    # save removed the earlier save's files instead, which the raising call should have left alone
    diffs = {lang: random_diff(tiny("bert"), 7, 0.1, s) for s, lang in enumerate(["de", "fr"])}
    out = tmp_path / "m" if folder == "earlier save" else tmp_path / "new" / "m"
    if folder == "earlier save":
        hf.save_pretrained(hf.convert(tiny("bert"), kind="multi", diffs=diffs), out)
        earlier = {name: (out / name).read_bytes() for name in os.listdir(out)}
    model = hf.convert(tiny("bert"), kind="multi", diffs={lang: d * 2.0 for lang, d in diffs.items()})
    save = xlsparse.SparseDiff.save

    def full_disk(self, path, *args, **kwargs):
        if path.endswith("lang1.safetensors"):
            raise OSError(28, "No space left on device")
        save(self, path, *args, **kwargs)

    monkeypatch.setattr(xlsparse.SparseDiff, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hf.save_pretrained(model, out)
    if folder == "new":
        assert not (tmp_path / "new").exists()
        return
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == earlier
    monkeypatch.setattr(xlsparse.SparseDiff, "save", save)
    # a failure while the written files are moved in: the folder holds no mix of the two saves
    replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("lang1.safetensors") and os.path.dirname(str(dst)) == str(out):
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output error"):
        hf.save_pretrained(model, out)
    assert os.listdir(out) == []


def test_a_reload_that_does_not_fit_changes_nothing(tmp_path):
    model, head = classifier("bert", num_labels=3)
    hf.convert(model, density=0.1, modules_to_save=[head])
    hf.save_pretrained(model, tmp_path / "sft")
    wrong, _ = classifier("bert", num_labels=5)
    before = {n: p.clone() for n, p in wrong.state_dict().items()}
    with pytest.raises(ValueError, match="classifier.weight.*shape"):
        hf.from_pretrained(wrong, tmp_path / "sft")
    assert not hasattr(wrong, "xlsparse_config")
    assert all(torch.equal(p, before[n]) for n, p in wrong.state_dict().items())


def test_a_keep_tied_model_reloads_as_it_was_saved(tmp_path):
    # keep_tied was not in the config: the reload converted without it and refused the tied head
    model = tiny("gpt2")
    hf.convert(model, ["h.0.attn.c_attn", "lm_head"], density=0.1, keep_tied=["lm_head"])
    with torch.no_grad():
        for _, m in model.named_modules():
            if hasattr(m, "delta_values"):
                m.delta_values.normal_(0, 0.05)
    hf.save_pretrained(model, tmp_path / "sft")
    reloaded = hf.from_pretrained(tiny("gpt2"), tmp_path / "sft")
    assert reloaded.xlsparse_config.keep_tied == ["lm_head"]
    ids = batch()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_extract_diff_refuses_a_keep_tied_layer_whose_twin_would_take_its_delta(kind):
    # the model runs the word embeddings without the head's Δ, but the extracted diff applied to a base
    # writes the one tensor both read: the result was 7.3 off in the logits, silently
    model = tiny("gpt2")
    targets = ["h.0.attn.c_attn", "lm_head"]
    if kind == "delta":
        hf.convert(model, targets, density=0.2, keep_tied=["lm_head"])
    else:
        diffs = {lang: xlsparse.SparseDiff({"lm_head.weight": xlsparse.SparseDelta.from_dense(
            torch.randn(VOCAB, 32) * (torch.rand(VOCAB, 32) < 0.2))}) for lang in ("de", "fr")}
        hf.convert(model, targets, kind="multi", diffs=diffs, keep_tied=["lm_head"])
    with pytest.raises(ValueError, match=r"extract_diff: 'lm_head' shares its weight with 'transformer.wte.weight'"):
        hf.extract_diff(model, **({"language": "de"} if kind == "multi" else {}))


def test_hf_merge_refuses_a_keep_tied_layer_whose_twin_would_see_its_delta():
    # merge writes W0 + Δ into the layer's weight in place: a keep_tied lm_head shares that tensor with
    # the word embeddings, which then took the head's Δ too (the logits moved by about 10, silently)
    model = tiny("gpt2")
    hf.convert(model, ["h.0.attn.c_attn", "lm_head"], density=0.2, keep_tied=["lm_head"])
    with torch.no_grad():
        for _, m in hf.model._converted(model):
            m.delta_values.normal_(0, 0.5)
    ids = batch()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    wte = model.transformer.wte.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge: 'lm_head' shares its weight with 'transformer.wte.weight'"):
        hf.merge(model)
    assert not any(m.merged for _, m in hf.model._converted(model))
    assert torch.equal(model.transformer.wte.weight, wte)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
        # the embeddings see W0 and the head W0 + Δ: what merge_and_unload keeps
        torch.testing.assert_close(hf.merge_and_unload(model)(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.transformer.wte.weight, wte)


def test_a_saved_head_untied_for_training_reloads_onto_an_untied_base_and_names_the_tie_of_a_tied_one(tmp_path):
    # convert's refusal of a tied head advises untying it; a fresh base is tied again, and the reload
    # said the base "lacks" lm_head.weight (its tied twin's name hid it) instead of naming the tie
    def untied(model):
        m = model.get_submodule("lm_head")
        m.weight = torch.nn.Parameter(m.weight.detach().clone())
        return model

    model = hf.convert(untied(tiny("gpt2")), density=0.1, modules_to_save=["lm_head"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    hf.save_pretrained(model, tmp_path / "sft")
    tied = tiny("gpt2")
    before = {n: p.clone() for n, p in tied.state_dict().items()}
    with pytest.raises(ValueError, match=r"'lm_head.weight' is tied to 'transformer.wte.weight'.*Untie them first"):
        hf.from_pretrained(tied, tmp_path / "sft")
    assert not hasattr(tied, "xlsparse_config")
    assert all(torch.equal(p, before[n]) for n, p in tied.state_dict().items())
    reloaded = hf.from_pretrained(untied(tiny("gpt2")), tmp_path / "sft")
    ids = batch()
    assert torch.equal(_bits(reloaded(input_ids=ids).logits), _bits(model(input_ids=ids).logits))


def test_save_and_reload_refuse_an_empty_or_non_path_directory_naming_it(tmp_path, monkeypatch):
    # from_pretrained(base, "") (an unset variable) read the working folder's save as the one asked
    # for, and save_pretrained("") / (None) failed in os calls naming no argument
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    hf.save_pretrained(model, tmp_path)
    monkeypatch.chdir(tmp_path)  # the working folder holds a save
    base, _ = classifier("bert", seed=0)
    with pytest.raises(ValueError, match="from_pretrained: directory: an empty path"):
        hf.from_pretrained(base, "")
    assert not hasattr(base, "xlsparse_config")
    with pytest.raises(ValueError, match="save_pretrained: directory: an empty path"):
        hf.save_pretrained(model, "")
    for bad in (None, 3):
        with pytest.raises(TypeError, match="save_pretrained: directory must be a str or os.PathLike"):
            hf.save_pretrained(model, bad)
        with pytest.raises(TypeError, match="from_pretrained: directory must be a str or os.PathLike"):
            hf.from_pretrained(base, bad)


def test_a_converted_model_deep_copies_and_pickles(tmp_path):
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    _train(model)
    twin = copy.deepcopy(model)
    ids = batch(2, 5)
    assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    _train(twin, seed=9)  # the copy trains and exports on its own
    assert not torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    assert hf.extract_diff(twin).nnz == hf.extract_diff(model).nnz
    torch.save(model, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    with hf.disable(back):
        pass
    older = model._xlsparse_record.__getstate__()  # as an xlsparse without `outside` pickled it
    del older["outside"]
    model._xlsparse_record = hf.model._Record.__new__(hf.model._Record)
    model._xlsparse_record.__setstate__(older)
    hf.save_pretrained(model, str(tmp_path / "saved"))


def test_a_model_cast_after_convert_is_refused_with_the_reason():
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.to(torch.float64)  # no cast of the values at convert is recorded for it
    with pytest.raises(ValueError, match=r"torch.float32 -> torch.float64.*changed dtype since convert"):
        hf.extract_diff(model)


def test_a_subnetwork_model_cast_after_convert_is_refused_with_the_reason():
    # disable and set_masks said the weight "changed outside its subnetworks" and blamed the optimizer
    base = tiny("bert")
    g = torch.Generator().manual_seed(0)
    masks = {"de": {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.1
                    for n in hf.model.target_names(base)}}
    model = hf.convert(base, kind="subnetwork", masks=masks).to(torch.float64)
    with pytest.raises(ValueError, match=r"disable: .*query.weight \(torch.float32 -> torch.float64\) changed dtype"):
        with hf.disable(model):
            pass
    with pytest.raises(ValueError, match=r"torch.float32 -> torch.float64.*changed dtype since convert"):
        hf.extract_diff(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_down_after_convert_trains_saves_and_disables(dtype, tmp_path):
    """PEFT's usual order (convert, then model.to(bfloat16)) refused every save: the base weights'
    bits had changed. The casts of their values at convert are recorded, so the base must be
    exactly the cast base, and a change after the cast is still refused."""
    model, head = classifier("bert")
    base = copy.deepcopy(model).to(dtype)
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # what training changes: the deltas and the saved head
        for p in (p for p in model.parameters() if p.requires_grad):
            p += (0.05 * torch.randn(p.shape, generator=g)).to(dtype)
    ids = batch()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        with hf.disable(model):
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    hf.save_pretrained(model, str(tmp_path / "saved"))
    loaded = hf.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=0)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[3, 0] += 1  # frozen: not in the diff
    with pytest.raises(ValueError, match=r"word_embeddings.weight'\] changed since convert"):
        hf.extract_diff(model)


def test_a_subnetwork_model_cast_down_after_convert_extracts_its_diff():
    base = tiny("bert")
    g = torch.Generator().manual_seed(0)
    masks = {"de": {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.1
                    for n in hf.model.target_names(base)}}
    plain = copy.deepcopy(base).to(torch.bfloat16)
    model = hf.convert(base, kind="subnetwork", masks=masks).to(torch.bfloat16)
    ids = batch()
    with torch.no_grad():
        for layer in (m for _, m in hf.model._converted(model, SubnetworkLinear)):
            layer.weight[layer.trainable_mask()] += 0.5  # what training changes: the masked entries only
        with hf.disable(model):
            torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
        trained = model(input_ids=ids, language_ids=torch.zeros(ids.shape[0], dtype=torch.long)).logits
    diff = hf.extract_diff(model)
    diff.apply(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained, rtol=0, atol=0)


def test_a_weight_with_other_strides_is_refused_by_merge_and_unloaded_by_merge_and_unload():
    # a weight loaded transposed: merge() and merge_and_unload raised "dense must be contiguous" from a kernel
    model, _ = classifier("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    query.weight = torch.nn.Parameter(query.weight.detach().t().contiguous().t())
    hf.convert(model, density=0.1)
    _train(model)
    ids = batch()
    by_hand = copy.deepcopy(model)
    for _, layer in hf.model._converted(by_hand, SparseDeltaLinear):
        w = layer.weight.detach().contiguous().reshape(-1).clone()
        w[layer.delta_indices.long()] += layer.delta_values.detach()
        layer.weight = torch.nn.Parameter(w.view(layer.weight.shape), requires_grad=False)
        layer.delta_values = torch.nn.Parameter(torch.zeros_like(layer.delta_values))
    with torch.no_grad():
        want = by_hand(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"merge: the base weight is not contiguous"):
        hf.merge(model)
    assert not any(layer.merged for _, layer in hf.model._converted(model, SparseDeltaLinear))  # none merged
    plain = hf.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def test_disable_names_a_saved_module_resized_since_convert():
    # it raised torch's "The size of tensor a (110) must match the size of tensor b (97)"
    model = hf.convert(tiny("llama"), density=0.1, modules_to_save=["lm_head"])
    model.resize_token_embeddings(model.config.vocab_size + 13, mean_resizing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"disable: .*'lm_head.weight': \(\(\d+, 32\), \(\d+, 32\)\).*resize_token"):
        with hf.disable(model):
            pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _NormHead(torch.nn.Module):
    """Two block linear layers and a head whose BatchNorm keeps running statistics (buffers)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
        self.head = torch.nn.ModuleDict(dict(lin=torch.nn.Linear(8, 8), norm=torch.nn.BatchNorm1d(8)))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head["norm"](self.head["lin"](x))


@pytest.mark.parametrize("kind", ["delta", "subnetwork"])
def test_a_saved_module_s_buffers_are_saved_restored_and_disabled(kind, tmp_path):
    # a training forward updates a BatchNorm's running statistics: save refused them as changed outside
    # the diff (though the module was in modules_to_save), and disable ran with the trained ones
    torch.manual_seed(0)
    model = _NormHead().eval()
    base, x = copy.deepcopy(model), torch.randn(16, 8)
    want_base = base(x)
    if kind == "delta":
        hf.convert(model, density=0.5, modules_to_save=["head"])
    else:
        masks = {"de": {f"layers.{i}.weight": torch.rand(8, 8) < 0.5 for i in range(2)}}
        hf.convert(model, kind="subnetwork", masks=masks, modules_to_save=["head"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(3):
        with hf.route(model, [0] * 16) if kind == "subnetwork" else contextlib.nullcontext():
            model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    trained = model(x)
    assert not torch.equal(model.head["norm"].running_mean, base.head["norm"].running_mean)
    with torch.no_grad(), hf.disable(model):
        assert torch.equal(model(x), want_base)
    assert torch.equal(model(x), trained)
    diff = hf.extract_diff(model)
    assert torch.equal(diff.absolute["head.norm.running_var"], model.head["norm"].running_var)
    applied = copy.deepcopy(base)
    diff.apply(applied)
    torch.testing.assert_close(applied(x), trained, rtol=1e-5, atol=1e-5)
    if kind == "delta":
        hf.save_pretrained(model, tmp_path)
        assert torch.equal(hf.from_pretrained(copy.deepcopy(base), tmp_path).eval()(x), trained)


def test_a_saved_module_with_a_tie_inside_it_reloads_onto_its_base(tmp_path):
    # the tied weight's second name was fingerprinted as a base weight with its trained value, and
    # from_pretrained refused the very base the model was trained from
    torch.manual_seed(0)
    model = _NormHead().eval()
    model.head["out"] = torch.nn.Linear(8, 8)
    model.head["out"].weight = model.head["lin"].weight
    base, x = copy.deepcopy(model), torch.randn(16, 8)
    hf.convert(model, density=0.5, modules_to_save=["head"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    hf.save_pretrained(model, tmp_path)
    reloaded = hf.from_pretrained(copy.deepcopy(base), tmp_path)
    assert reloaded.head["out"].weight is reloaded.head["lin"].weight
    assert torch.equal(reloaded.head["out"].weight, model.head["out"].weight)
    assert torch.equal(reloaded(x), model(x))


def test_merge_and_unload_refuses_a_language_for_a_delta_model():
    model, _ = classifier("bert")
    hf.convert(model, density=0.1)
    with pytest.raises(ValueError, match="language= is for kind='multi'"):
        hf.merge_and_unload(model, language="de")


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_and_unload_refuses_while_an_apply_of_the_layers_weights_is_in_place(arch):
    # the plain layers hold new weight tensors: the apply's revert wrote the old ones and left its
    # diff in the unloaded model, silently (and reverted the tensors it shared, such as biases)
    model, _ = classifier(arch)
    ids = batch(2, 5)
    hf.convert(model, density=0.1)
    _train(model)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear))
    shape = tuple(layer.weight.shape)[::-1] if layer.transposed else tuple(layer.weight.shape)  # the model's layout
    lang = xlsparse.SparseDiff({f"{name}.weight": xlsparse.SparseDelta(torch.arange(0, layer.weight.numel(), 7),
                                                                        torch.ones(len(range(0, layer.weight.numel(), 7))),
                                                                        shape)})
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    before = {n: p.clone() for n, p in model.state_dict().items()}
    handle = xlsparse.apply([lang], model)
    with pytest.raises(RuntimeError, match="merge_and_unload: an xlsparse.apply that is not reverted"):
        hf.merge_and_unload(model)
    handle.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    torch.testing.assert_close(hf.merge_and_unload(model)(input_ids=ids).logits, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_convert_of_a_model_with_an_apply_in_place(arch):
    # GPT-2's Conv1D layers are converted into transposed copies: the apply's revert wrote the old
    # tensors and left its diff in the converted model, silently. nn.Linear weights are shared,
    # so there the revert still reaches the converted model.
    import gc

    model, _ = classifier(arch)
    ids = batch(2, 5)
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    handle = xlsparse.apply([random_diff(model, nnz=20, scale=0.5, seed=3)], model)
    if arch == "gpt2":
        before = {n: p.clone() for n, p in model.state_dict().items()}
        with pytest.raises(RuntimeError, match="convert: an xlsparse.apply that is not reverted"):
            hf.convert(model, density=0.1)
        assert not hasattr(model, "xlsparse_config")
        assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
        del handle  # a dropped handle keeps the diff for good: nothing to protect
        gc.collect()
        hf.convert(model, density=0.1)
        return
    hf.convert(model, density=0.1)
    handle.revert()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_stray_trained_parameter_makes_extract_diff_raise(arch):
    model, head = classifier(arch)
    hf.convert(model, density=0.1, modules_to_save=[head])
    _train(model, steps=1)
    hf.extract_diff(model)  # fine
    ln = next(n for n, _ in model.named_parameters() if "LayerNorm" in n or "ln_" in n)
    with torch.no_grad():
        dict(model.named_parameters())[ln].add_(1e-3)  # trained outside the diff
    with pytest.raises(ValueError, match=ln.replace(".", r"\.")):
        hf.extract_diff(model)
    with pytest.raises(ValueError, match="changed since convert"):
        hf.save_pretrained(model, "/nonexistent/never-written")
    # the same on a merged model: the check skipped every merged weight, so a base weight changed
    # off the delta's support was saved without the change
    model, head = classifier(arch)
    hf.convert(model, density=0.1, modules_to_save=[head])
    _train(model, steps=1)
    hf.merge(model)
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear))
    free = torch.ones(layer.weight.numel(), dtype=torch.bool)
    free[layer.delta_indices.long()] = False
    with torch.no_grad():
        layer.weight.view(-1)[free.nonzero()[0]] += 1e-3
    with pytest.raises(ValueError, match="changed since convert"):
        hf.save_pretrained(model, "/nonexistent/never-written")


def test_frozen_values_moved_to_other_positions_make_extract_diff_raise():
    # Same values, other places: a different model, so the check must depend on positions.
    model, head = classifier("bert")
    ln = next(n for n, _ in model.named_parameters() if "LayerNorm.weight" in n)
    weight = dict(model.named_parameters())[ln]
    with torch.no_grad():
        weight.normal_()  # distinct values, so that a swap changes the tensor
    hf.convert(model, density=0.1, modules_to_save=[head])
    with torch.no_grad():
        weight[[0, 1]] = weight[[1, 0]].clone()
    with pytest.raises(ValueError, match=ln.replace(".", r"\.")):
        hf.extract_diff(model)


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_an_extracted_diff_keeps_its_entries_when_the_layers_move_on(kind):
    """extract_diff's deltas held the layers' delta_indices buffers themselves: set_support (same K,
    as drop-and-regrow) or load_state_dict of another checkpoint wrote them in place and moved the
    entries of a diff extracted before, its values staying the old ones."""
    model = tiny("bert")
    if kind == "delta":
        hf.convert(model, density=0.05)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, SparseDeltaLinear):
                    m.delta_values.normal_()  # as trained: a moved entry shows
    else:
        hf.convert(model, kind="multi", diffs={"de": random_diff(tiny("bert"), 7, 0.1, 1)})
    snap = hf.extract_diff(model, **({"language": "de"} if kind == "multi" else {}))
    dense = {n: d.to_dense().clone() for n, d in snap.deltas.items()}
    other = tiny("bert")
    if kind == "delta":
        hf.convert(other, density=0.05)  # another random support of the same size
        name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear))
        k = layer.delta_indices.numel()
        layer.set_support(torch.randperm(layer.weight.numel())[:k].sort().values.to(layer.delta_indices.dtype))
        assert torch.equal(snap.deltas[f"{name}.weight"].to_dense(), dense[f"{name}.weight"])
    else:
        hf.convert(other, kind="multi", diffs={"de": random_diff(tiny("bert"), 7, 0.1, 2)})
    model.load_state_dict(other.state_dict())
    for n, d in snap.deltas.items():
        assert torch.equal(d.to_dense(), dense[n]), n


def test_a_tied_head_is_refused_where_it_is_tied():
    model = tiny("gpt2")
    assert hf.tied_parameters(model)["lm_head.weight"] == ["transformer.wte.weight"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="tied"):
        hf.convert(model, target_modules=["lm_head"], density=0.1)
    xlmr = tiny("xlmr")
    with pytest.raises(ValueError, match=r"lm_head\.decoder\.weight.*tied"):
        hf.convert(xlmr, density=0.1, modules_to_save=["lm_head"])
    for n, p in model.state_dict().items():  # nothing was written
        assert torch.equal(p, before[n]), n
    assert all(not isinstance(m, SparseDeltaLinear) for m in model.modules())


def test_tied_gpt2_from_models_apply_reproduces_tuned_and_reverts_bit_exactly():
    base = tiny("gpt2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():  # the tied wte/lm_head tensor is changed once
            p.add_(torch.randn_like(p) * 0.05)
    diff = xlsparse.SparseDiff.from_models(base, tuned, density=1.0)
    assert "transformer.wte.weight" in diff.deltas and "lm_head.weight" not in diff.deltas
    ids = batch()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    handle = xlsparse.apply([diff], base)
    torch.testing.assert_close(base(input_ids=ids).logits, tuned(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    handle.revert()
    for n, p in base.named_parameters():
        assert torch.equal(_bits(p), _bits(before[n])), n
    # a diff naming both names of the tied tensor would add the delta twice: refused
    both = xlsparse.SparseDiff({"transformer.wte.weight": diff.deltas["transformer.wte.weight"],
                                "lm_head.weight": diff.deltas["transformer.wte.weight"]})
    with pytest.raises(ValueError, match="one tied tensor"):
        xlsparse.apply([both], base)


def test_from_models_of_a_state_dict_of_separate_copies_keeps_bases_ties():
    # tuned given as {name: tensor.clone()} shows no ties: exclude=["embeddings"] kept the decoder's
    # copy of BERT's tied word embeddings, and applying the diff to the tied base changed them.
    base = tiny("bert")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    copies = {n: t.clone() for n, t in tuned.state_dict().items()}
    emb, dec = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    for exclude, held in ((["embeddings", "bias"], set()), (["bias"], {emb})):
        want = xlsparse.SparseDiff.from_models(base, tuned, exclude=exclude)
        got = xlsparse.SparseDiff.from_models(base, copies, exclude=exclude)
        assert list(got.deltas) == list(want.deltas) and {emb, dec} & set(got.deltas) == held
        for name, delta in want.deltas.items():
            assert torch.equal(got.deltas[name].values, delta.values)
        applied = copy.deepcopy(base)
        got.apply(applied)
        expect = (tuned if held else base).bert.embeddings.word_embeddings.weight
        torch.testing.assert_close(applied.bert.embeddings.word_embeddings.weight, expect, rtol=0,
                                   atol=0 if not held else 1e-7)  # untouched: bit for bit
    copies[dec] = copies[dec] + 1  # the two copies disagree: no diff of the tied base holds both
    with pytest.raises(ValueError, match="ties.*different values"):
        xlsparse.SparseDiff.from_models(base, copies)


@pytest.mark.parametrize("kind", ["delta", "subnetwork"])
def test_a_diff_applied_to_a_converted_gpt2_lands_in_the_conv1d_layout(kind):
    """A converted Conv1D stores its weight [out, in]; diffs are in the model's [in, out] layout.
    A square weight (attn.c_proj) took the diff transposed, silently, and the others raised."""
    base = tiny("gpt2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n.endswith("weight") and p.dim() == 2 and "wte" not in n and "wpe" not in n:
                p.add_(torch.randn_like(p) * 0.05)
    diff = xlsparse.SparseDiff.from_models(base, tuned, density=0.2, include=r"\.h\.")
    square = "transformer.h.0.attn.c_proj.weight"
    dense = xlsparse.SparseDiff({}, {square: torch.randn_like(base.get_parameter(square)) * 0.05})
    plain = copy.deepcopy(base)
    if kind == "delta":
        hf.convert(base, density=0.05)
    else:
        hf.convert(base, kind="subnetwork", masks={"en": {}})
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ids = batch()
    with torch.no_grad():
        for d in (dense, diff):  # the square weight alone first: it went in transposed
            with xlsparse.apply([d], plain), xlsparse.apply([d], base):
                torch.testing.assert_close(base(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    for n, p in base.named_parameters():
        assert torch.equal(_bits(p), _bits(before[n])), n
    # a diff in the stored [out, in] layout (the converted parameter's shape) is named as given
    wide = "transformer.h.0.attn.c_attn.weight"
    stored = tuple(base.get_parameter(wide).shape)
    with pytest.raises(ValueError, match=rf"has shape \({stored[0]}, {stored[1]}\), but diffs are in the model's own layout"):
        xlsparse.apply([xlsparse.SparseDiff({wide: xlsparse.SparseDelta(torch.tensor([1]), torch.ones(1), stored)})], base)


def test_xlmr_body_diff_keeps_the_tied_word_embeddings_under_their_base_name():
    # transformers 5 names XLM-R's tied matrix lm_head.decoder.weight first: a body-only language
    # SFT (composable-sft's: everything under base_model_prefix) lost every word-embedding change.
    base = tiny("xlmr")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    name = "roberta.embeddings.word_embeddings.weight"
    # state dicts too: they have no base_model_prefix, and the body is where most names are
    cases = [(kw, models) for kw in (dict(exclude=[r"lm_head"]), dict(include=r"^roberta\."))
             for models in ((base, tuned), (base.state_dict(), tuned.state_dict()))]
    for kw, (b, t) in cases:
        body = xlsparse.SparseDiff.from_models(b, t, density=1.0, **kw)
        assert name in body.deltas and "lm_head.decoder.weight" not in body.deltas, kw
        fresh = copy.deepcopy(base)
        with body.applied(fresh):
            assert torch.equal(fresh.roberta.embeddings.word_embeddings.weight, tuned.roberta.embeddings.word_embeddings.weight)


def _trained_classifier():
    """A BERT classifier converted (density 0.2, its head saved whole) and trained a few steps; its head's name."""
    model, head = classifier("bert")
    hf.convert(model, density=0.2, modules_to_save=[head])
    _train(model)
    return model, head


def test_disable_runs_the_base_model_and_restores_the_trained_one():
    model, _ = _trained_classifier()
    base, _ = classifier("bert")
    ids = batch()
    trained = model(input_ids=ids).logits
    with hf.disable(model):
        assert torch.equal(_bits(model(input_ids=ids).logits), _bits(base(input_ids=ids).logits))
    assert torch.equal(_bits(model(input_ids=ids).logits), _bits(trained))


def test_disable_refuses_a_tensor_frozen_at_convert_that_trained_since():
    # a converted layer's bias is frozen at convert; unfrozen and trained, the block ran its
    # trained value as the base's (2.9e-6 off the base's logits, silently)
    model, _ = classifier("bert")
    hf.convert(model, density=0.2)
    bias = model.bert.encoder.layer[0].attention.self.query.bias
    bias.requires_grad_(True)  # unfrozen but not changed: still the base
    with hf.disable(model):
        pass
    with torch.no_grad():
        bias.add_(1e-3)  # as a step would
    with pytest.raises(ValueError, match=r"disable: \['bert.encoder.layer.0.attention.self.query.bias'\] were frozen"):
        with hf.disable(model):
            pass


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_inside_disable_is_refused(how, tmp_path):
    # a deep copy (or pickle) made inside the block kept the base state for good: deltas off, the
    # saved head at its value from convert; it ran the base model with no way back
    model, _ = _trained_classifier()
    ids = batch()
    trained = model(input_ids=ids).logits
    with hf.disable(model):
        with pytest.raises(RuntimeError, match="disable"):
            copy.deepcopy(model) if how == "deepcopy" else torch.save(model, tmp_path / "m.pt")
    assert torch.equal(_bits(model(input_ids=ids).logits), _bits(trained))
    assert torch.equal(_bits(copy.deepcopy(model)(input_ids=ids).logits), _bits(trained))  # outside: fine


def test_an_apply_left_in_place_inside_disable_is_reverted_on_exit():
    """disable's exit restores the trained state under a handle made inside the block; reverting
    that handle after the block then wrote the base values it displaced over the trained head
    and weights, silently. The exit now reverts it (changes inside the block are not kept)."""
    model, head = _trained_classifier()
    ids = batch()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(input_ids=ids).logits
    w = f"{head}.weight"
    layer = next(n for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear))
    diff = xlsparse.SparseDiff({w: xlsparse.SparseDelta(torch.tensor([0, 5]), torch.tensor([0.5, -0.5]), trained[w].shape),
                                f"{layer}.weight": xlsparse.SparseDelta(torch.tensor([1]), torch.tensor([2.0]),
                                                                        trained[f"{layer}.weight"].shape)})
    with hf.disable(model):
        handle = diff.apply(model)
    with pytest.raises(RuntimeError, match="already reverted"):
        handle.revert()
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(trained[n])), n
    assert torch.equal(_bits(model(input_ids=ids).logits), _bits(logits))
    with hf.disable(model), diff.applied(model):  # reverted inside the block: nothing left to do
        pass
    with diff.applied(model), hf.disable(model):  # made before the block: stays until its own revert
        pass
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(trained[n])), n


def test_disable_restores_the_trained_state_after_a_merge_made_inside_the_block():
    # disable's exit looks up the applies made in the block in the apply registry, which also
    # holds merge()'s EntryWrite records: it raised AttributeError there, before restoring the head
    model, _ = _trained_classifier()
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    with hf.disable(model):
        hf.merge(model)
    hf.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(trained[n])), n


def test_disable_restores_the_trained_head_when_its_exit_cannot_revert_an_apply_made_inside():
    # an apply made in the block, then a merge over its entries: the exit's revert is refused, and
    # the modules to save were left at their base values (the trained head lost), the error silent on it
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).eval()
    hf.convert(model, target_modules=["0"], density=0.5, modules_to_save=["2"])
    with torch.no_grad():
        model[0].delta_values.normal_()
        model[2].weight.add_(1.0)
    trained = model[2].weight.detach().clone()
    idx = model[0].delta_indices[:2].long()
    diff = xlsparse.SparseDiff({"0.weight": xlsparse.SparseDelta(idx, torch.tensor([1.0, 2.0]), (3, 4))})
    with pytest.raises(RuntimeError, match="later apply"):
        with hf.disable(model):
            handle = xlsparse.apply([diff], model)
            hf.merge(model)
    assert torch.equal(model[2].weight, trained)
    hf.unmerge(model)
    handle.revert()


# --- routing ---

def _multi(arch="llama"):
    model = tiny(arch)
    diffs = {lang: random_diff(model, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    return hf.convert(model, kind="multi", diffs=diffs)


def test_a_shallow_copy_of_a_converted_model_refuses_to_run_or_save_the_original(tmp_path):
    # copy.copy shared the instance's forward and save_pretrained, bound to the original: the
    # copy ran the original's forward (its config) and saved the original's config
    model = _multi("bert")
    ids = batch(2, 5)
    shallow = copy.copy(model)
    shallow.config = copy.deepcopy(model.config)
    shallow.config.output_hidden_states = True
    with pytest.raises(RuntimeError, match="copy.deepcopy"):
        shallow(input_ids=ids, language_ids=[0, 1])
    with pytest.raises(RuntimeError, match="copy.deepcopy"):
        shallow.save_pretrained(str(tmp_path / "shallow"))
    with pytest.raises(RuntimeError, match="copy.deepcopy"):
        copy.deepcopy(shallow)
    assert not os.path.exists(tmp_path / "shallow")
    with torch.no_grad():  # the original and its deep copies are untouched
        want = model(input_ids=ids, language_ids=[0, 1]).logits
        twin = copy.deepcopy(copy.deepcopy(model))
        assert twin.forward.model is twin and twin.save_pretrained.model is twin
        assert torch.equal(twin(input_ids=ids, language_ids=[0, 1]).logits, want)
    model.save_pretrained(str(tmp_path / "model"))
    twin.save_pretrained(str(tmp_path / "twin"))


@pytest.mark.parametrize("kind", ["multi", "subnetwork"])
def test_a_routed_model_routes_its_language_ids_after_pickle_and_deepcopy(kind, tmp_path):
    # The language_ids keyword lives on the instance; a pickled model once came back with the
    # class's own forward, which ignored the ids: a 'multi' model ran the base for every language.
    model = tiny("llama")
    if kind == "multi":
        model = _multi()
    else:
        g = torch.Generator().manual_seed(0)
        masks = {lang: {f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g) < 0.3
                        for n in hf.model.target_names(model)} for lang in ("de", "fr")}
        hf.convert(model, kind="subnetwork", masks=masks)
    ids, langs = batch(2, 6), torch.tensor([1, 0])

    def run(m):
        """Training-mode logits and the gradients that routing steers."""
        m.train().zero_grad()
        logits = m(input_ids=ids, language_ids=langs).logits
        logits.square().sum().backward()
        return logits.detach(), [p.grad for p in m.parameters() if p.requires_grad]

    want, want_grads = run(model)
    if kind == "multi":
        with torch.no_grad(), hf.disable(model):
            assert not torch.equal(model.eval()(input_ids=ids).logits, want)  # the base model
    torch.save(model, tmp_path / "model.pt")
    for twin in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert "language_ids" in inspect.signature(twin.forward).parameters
        assert twin.forward.model is twin
        got, grads = run(twin)
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))


def test_a_routed_model_runs_after_accelerates_mixed_precision_unwrap():
    # unwrap_model(keep_fp32_wrapper=False) binds the original forward (our object) as a method again
    accelerate = pytest.importorskip("accelerate")
    model = _multi()
    ids, langs = batch(2, 6), torch.tensor([1, 0])
    want = model(input_ids=ids, language_ids=langs).logits
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier Trainer fixed the precision
    try:
        acc = accelerate.Accelerator(mixed_precision="bf16", cpu=True)
        plain = acc.unwrap_model(acc.prepare(model), keep_fp32_wrapper=False)
        assert torch.equal(plain(input_ids=ids, language_ids=langs).logits, want)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("kind", ["multi", "subnetwork"])
def test_routed_models_train_under_gradient_checkpointing(kind):
    # the recomputation runs in the backward, after route() has ended: checkpoint_context re-enters it
    def build():
        model = tiny("llama")
        if kind == "multi":
            return hf.convert(model, kind="multi", diffs={lang: random_diff(model, 20, 0.3, seed=e)
                                                          for e, lang in enumerate(["de", "fr"])})
        g = torch.Generator().manual_seed(0)
        names = hf.model.target_names(model)
        masks = {lang: {f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g) < 0.3
                        for n in names} for lang in ("de", "fr")}
        return hf.convert(model, kind="subnetwork", masks=masks)

    ids, langs = batch(2, 6), torch.tensor([1, 0])
    grads = []
    for checkpointing in (False, True):
        model = build().train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False, "context_fn": xlsparse.routing.checkpoint_context})
        model(input_ids=ids, labels=ids, language_ids=langs).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_a_trainer_with_gradient_checkpointing_names_the_kwargs_that_route_the_recomputation(tmp_path):
    # TrainingArguments(gradient_checkpointing=True) on a routed model: the error said to put
    # `language_ids` in the batch (it was there) and named torch's checkpoint, not the HF setting
    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = batch(8, 6)[i]
            return {"input_ids": ids, "labels": ids, "language_ids": torch.tensor(i % 2)}

    def train(**kwargs):
        base = tiny("llama")
        model = hf.convert(base, kind="multi", diffs={lang: random_diff(base, 20, 0.3, seed=e)
                                                      for e, lang in enumerate(["de", "fr"])})
        args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                              learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                              **kwargs)
        transformers.Trainer(model=model, args=args, train_dataset=Mixed()).train()
        return [p.detach() for p in model.parameters() if p.requires_grad]

    with pytest.raises(RuntimeError, match=r"recomputed by gradient checkpointing.*gradient_checkpointing_kwargs"):
        train(gradient_checkpointing=True)
    named = train(gradient_checkpointing=True, gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": xlsparse.routing.checkpoint_context})
    for got, want in zip(named, train()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_routing_ids_must_fit_the_batch():
    model = _multi()
    ids = batch(4, 3)
    with pytest.raises(ValueError, match=r"shape \[2\].*\[4, 3\]"):  # 2 divides 12 tokens: still refused
        with hf.route(model, torch.tensor([0, 1])):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="empty|one id per example"):
        with hf.route(model, torch.zeros(0, dtype=torch.long)):
            model(input_ids=ids)
    for empty in ([], (), torch.zeros(0)):  # an empty list became a float tensor: "ids must be integers", a TypeError
        with pytest.raises(ValueError, match="one id per example"):
            with hf.route(model, empty):
                model(input_ids=ids)
    with pytest.raises(ValueError, match="unknown language 'es'"):
        with hf.route(model, ["de", "es", "fr", "de"]):
            pass


def test_names_per_token_ids_and_the_batch_field_route_alike():
    model = _multi()
    ids = batch(4, 3)
    with hf.route(model, torch.tensor([0, 1, -1, 1])):
        by_int = model(input_ids=ids).logits
    with hf.route(model, ["de", "fr", None, "fr"]):
        by_name = model(input_ids=ids).logits
    per_token = torch.tensor([0, 1, -1, 1]).unsqueeze(1).expand(4, 3)
    with hf.route(model, per_token):
        by_token = model(input_ids=ids).logits
    by_field = model(input_ids=ids, language_ids=torch.tensor([0, 1, -1, 1])).logits
    for other in (by_name, by_token, by_field):
        assert torch.equal(other, by_int)
    with hf.disable(model):
        assert not torch.equal(by_int[0], model(input_ids=ids).logits[0])  # the base only


def test_route_works_on_layers_built_with_from_linear():
    lin = torch.nn.Linear(6, 5)
    deltas = {n: xlsparse.SparseDelta(torch.tensor([1, 7]), torch.tensor([0.5, -1.0]), (5, 6)) for n in ("a", "b")}
    net = torch.nn.Sequential(MultiDeltaLinear.from_linear(lin, deltas))
    with hf.route(net, ["b", "a"]):
        y = net(torch.randn(2, 6))
    assert y.shape == (2, 5)
    # a bool in a list of ids is not id 1 (torch.as_tensor([True, 0]) is int64)
    for ids in ([True, 0], [[0, False]]):
        with pytest.raises(TypeError, match="ids must be integers"):
            with hf.route(net, ids):
                pass


def test_training_a_routed_model_without_routing_raises():
    model = _multi().train()
    with pytest.raises(RuntimeError, match="no language routing"):
        model(input_ids=batch())
    masks = {lang: {"model.layers.0.mlp.up_proj.weight": torch.rand(48, 32) < 0.5} for lang in ("de", "fr")}
    sub = hf.convert(tiny("llama"), kind="subnetwork", masks=masks).train()
    with pytest.raises(RuntimeError, match="no language routing"):
        sub(input_ids=batch())


def test_trainer_routes_the_language_ids_column():
    datasets = pytest.importorskip("datasets")
    model, head = classifier("bert")
    g = torch.Generator().manual_seed(0)
    # Only language 1 ("fr") has data: "de"'s deltas must not move, "fr"'s must.
    diffs = {}
    for lang in ("de", "fr"):
        deltas = {}
        for name in hf.model.target_names(model):
            w = model.get_submodule(name).weight
            idx = torch.randperm(w.numel(), generator=g)[:10].sort().values
            deltas[f"{name}.weight"] = xlsparse.SparseDelta(idx, torch.zeros(10), w.shape)
        diffs[lang] = xlsparse.SparseDiff(deltas)
    hf.convert(model, kind="multi", diffs=diffs, modules_to_save=[head])
    rows = {"input_ids": torch.randint(3, VOCAB, (16, 6), generator=g).tolist(),
            "labels": torch.randint(0, 3, (16,), generator=g).tolist(), "language_ids": [1] * 16}
    args = transformers.TrainingArguments(output_dir="/tmp/xlsparse-trainer-test", max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows)).train()
    layer = model.get_submodule(hf.model.target_names(classifier("bert")[0])[0])
    assert torch.count_nonzero(layer.delta_values[0]) == 0
    assert torch.count_nonzero(layer.delta_values[1]) > 0


def test_trainer_evaluate_routes_by_the_language_ids_column_or_raises(tmp_path):
    # A plain Trainer's evaluate whose batches lost `language_ids` (a column of names, which
    # transformers' default collator drops, or a collator of the user's own) ran the routed layers
    # as the base: it reported the base's loss (4.571 where the languages' was 4.535) silently
    datasets = pytest.importorskip("datasets")
    model = tiny("bert")
    model = hf.convert(model, kind="multi", diffs={lang: random_diff(model, 80, 0.5, seed=e) for e, lang in
                                                   enumerate(["de", "fr"])})
    ids, langs = batch(4, 7), [0, 1, 1, 0]
    with torch.no_grad():
        with hf.route(model, torch.tensor(langs)):
            routed = model(input_ids=ids, labels=ids).loss.item()
        with hf.disable(model):
            base = model(input_ids=ids, labels=ids).loss.item()
    assert abs(routed - base) > 1e-3
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[],
                                          use_cpu=True, disable_tqdm=True)

    def evaluate(column, **kwargs):
        rows = {"input_ids": ids.tolist(), "labels": ids.tolist(), "language_ids": column}
        trainer = transformers.Trainer(model=model, args=args, eval_dataset=datasets.Dataset.from_dict(rows), **kwargs)
        return trainer.evaluate()["eval_loss"]

    assert evaluate(langs) == pytest.approx(routed, rel=1e-6)
    with pytest.raises(RuntimeError, match="language_ids"):
        evaluate([hf.model.languages(model)[i] for i in langs])  # names: the default collator drops them

    def without_ids(rows):  # a collator of the user's own that leaves the field out
        return {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "labels")}

    with pytest.raises(RuntimeError, match="language_ids"):
        evaluate(langs, data_collator=without_ids)


def test_an_eval_forward_of_a_multi_model_without_language_ids_raises():
    # It ran the routed layers as the base, silently; the base must be asked for (ids of -1, disable)
    base, model = tiny("llama"), _multi("llama")
    ids = batch(2, 5)
    with torch.no_grad():
        for run in (lambda: model(input_ids=ids), lambda: model.model(input_ids=ids),
                    lambda: model.generate(ids, max_new_tokens=2, do_sample=False)):
            with pytest.raises(RuntimeError, match=r"no language routing.*route.*language_ids.*-1.*disable"):
                run()
        want = base(input_ids=ids).logits
        with hf.route(model, [-1, -1]):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids, language_ids=[None, None]).logits, want, rtol=0, atol=0)
        with hf.disable(model):
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=0, atol=0)


def test_an_eval_forward_of_a_subnetwork_model_needs_no_ids():
    # Its weights are shared by every language (the masks steer their gradients only): its output
    # is the trained model's with ids or without, never the base's
    base = tiny("llama")
    g = torch.Generator().manual_seed(0)
    masks = {lang: {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.3
                    for n in hf.model.target_names(base)} for lang in ("de", "fr")}
    model = hf.convert(copy.deepcopy(base), kind="subnetwork", masks=masks)
    with torch.no_grad():
        for _, layer in hf.model._converted(model, SubnetworkLinear):
            layer.weight.add_(0.1 * torch.randn(layer.weight.shape, generator=g))  # as if trained
        ids = batch(2, 5)
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got, model(input_ids=ids, language_ids=[0, 1]).logits, rtol=0, atol=0)
        assert not torch.allclose(got, base(input_ids=ids).logits)


def test_a_minus_one_example_is_refused_where_the_modules_to_save_are_shared():
    # id -1 means base only / no update, but a 'multi' model's modules to save are one module for
    # every language: the -1 example's logits came from the trained head (0.05 off the base's),
    # and in training its loss moved that head
    base, head = classifier("bert")
    model = hf.convert(copy.deepcopy(base), kind="multi", modules_to_save=[head],
                       diffs={lang: random_diff(base, 10, 0.1, seed=e) for e, lang in enumerate(["de", "fr"])})
    with torch.no_grad():
        model.get_submodule(head).weight.add_(1.0)  # as if trained
    ids = batch(3, 5)
    for langs in (torch.tensor([0, 1, -1]), ["de", "fr", None], torch.tensor([[0] * 5, [1] * 5, [1, 1, -1, -1, -1]])):
        with pytest.raises(ValueError, match="modules_to_save"):
            model(input_ids=ids, language_ids=langs)
        with pytest.raises(ValueError, match="modules_to_save"):
            with hf.route(model, langs):
                pass
        with pytest.raises(ValueError, match="modules_to_save"):  # a wrapper (DDP) holding it
            with hf.route(torch.nn.ModuleList([model]), langs):
                pass
    with hf.disable(model), torch.no_grad():  # the way to run an example on the base, ids or not
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
        assert torch.equal(model(input_ids=ids, language_ids=torch.tensor([0, 1, -1])).logits, base(input_ids=ids).logits)
    model(input_ids=ids, language_ids=torch.tensor([0, 1, 1]))  # every example with a language: fine
    plain = _multi("bert")  # no modules to save: -1 is the base, as documented
    with torch.no_grad():
        got = plain(input_ids=ids, language_ids=torch.tensor([-1, -1, -1])).logits
        with hf.disable(plain):
            assert torch.equal(got, plain(input_ids=ids).logits)
    # a 'subnetwork' model's head is shared too: a -1 example's loss gave it a gradient (no update, said DESIGN)
    g = torch.Generator().manual_seed(0)
    masks = {lang: {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.3
                    for n in hf.model.target_names(base)} for lang in ("de", "fr")}
    sub = hf.convert(copy.deepcopy(base), kind="subnetwork", masks=masks, modules_to_save=[head]).train()
    with pytest.raises(ValueError, match="modules_to_save"):
        sub(input_ids=ids, language_ids=torch.tensor([0, 1, -1]))
    sub(input_ids=ids, language_ids=torch.tensor([0, 1, 1])).logits.sum().backward()


@pytest.mark.parametrize("kind", ["multi", "subnetwork"])
def test_a_minus_one_example_is_refused_when_a_part_of_the_model_is_routed(kind):
    # route(model.bert, ids) did not see the model's modules_to_save (they lie outside model.bert): the
    # -1 example then ran through the trained head (0.8 off the base's logits), while model(...,
    # language_ids=ids) refused the same ids
    base, head = classifier("bert")
    g = torch.Generator().manual_seed(0)
    langs = ["de", "fr"]
    spec = (dict(diffs={lang: random_diff(base, 10, 0.1, seed=e) for e, lang in enumerate(langs)}) if kind == "multi"
            else dict(masks={lang: {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.3
                                    for n in hf.model.target_names(base)} for lang in langs}))
    model = hf.convert(copy.deepcopy(base), kind=kind, modules_to_save=[head], **spec)
    ids = batch(3, 5)
    for part in (model.bert, model.bert.encoder, model.bert.encoder.layer[0]):
        with pytest.raises(ValueError, match="modules_to_save"):
            with hf.route(part, torch.tensor([0, 1, -1])):
                pass
    with hf.route(model.bert, torch.tensor([0, 1, 1])):  # every example with a language: fine
        model(input_ids=ids)
    with hf.disable(model), hf.route(model.bert, torch.tensor([0, 1, -1])):  # the base state: -1 is the base
        pass
    clone = copy.deepcopy(model)  # the copy's layers read the copy's own bookkeeping
    assert clone.bert.encoder.layer[0].attention.self.query._xlsparse_owner[1] is clone._xlsparse_record
    with pytest.raises(ValueError, match="modules_to_save"):
        with hf.route(clone.bert, torch.tensor([0, 1, -1])):
            pass


# --- mixed precision ---

def _autocast_pair(layer, reference, x):
    """Forward and backward of a converted layer and of its unconverted equivalent under CPU bf16 autocast."""
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = []
    for mod, xi in zip((layer, reference), xs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mod(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        outs.append(y)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_a_module_swapped_in_after_convert_that_trains_is_refused_by_save(kind, tmp_path):
    # A Linear added after convert trained under names the record did not know: save_pretrained
    # wrote the diff without it, and the reloaded model lacked the module's change, silently.
    model = tiny("bert")
    if kind == "delta":
        hf.convert(model, density=0.05)
    else:
        hf.convert(model, kind="multi", diffs={"de": random_diff(model, 5, 0.1, 1)})
    layer = model.bert.encoder.layer[0].output
    layer.dense = torch.nn.Sequential(layer.dense, torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"\['bert.encoder.layer.0.output.dense.1.weight', "
                                         r"'bert.encoder.layer.0.output.dense.1.bias'\] train but did not exist"):
        hf.save_pretrained(model, tmp_path / "sft")
    assert not (tmp_path / "sft").exists()


def _frozen_swap(model, how):
    """Change the frozen layer-0 output block of a converted tiny BERT after convert, as `how` says."""
    out = model.bert.encoder.layer[0].output
    if how == "added":  # a Dropout (no parameters) replaced by a frozen Linear: new names only
        out.dropout = torch.nn.Linear(32, 32).requires_grad_(False)
    elif how == "removed":  # the LayerNorm's weight and bias are gone
        out.LayerNorm = torch.nn.Identity()
    elif how == "renamed":  # the same LayerNorm, under new names
        out.LayerNorm = torch.nn.Sequential(out.LayerNorm)
    else:  # "replaced": the same names, other values
        out.LayerNorm = torch.nn.LayerNorm(32).requires_grad_(False)
        torch.nn.init.constant_(out.LayerNorm.weight, 2.0)


@pytest.mark.parametrize("kind", ["delta", "multi"])
@pytest.mark.parametrize("how", ["added", "removed", "renamed", "replaced"])
def test_a_frozen_module_swapped_in_after_convert_is_refused_by_save_and_extract(kind, how, tmp_path):
    # A frozen module swapped in or out after convert changed the outputs, but neither file of
    # save_pretrained nor extract_diff holds it: the reloaded model was another, silently.
    model = tiny("bert")
    if kind == "delta":
        hf.convert(model, density=0.05)
    else:
        hf.convert(model, kind="multi", diffs={"de": random_diff(model, 5, 0.1, 1)})
    ids, lang = batch(), ({} if kind == "delta" else {"language": "de"})
    routed = {} if kind == "delta" else {"language_ids": torch.zeros(len(ids), dtype=torch.long)}
    with torch.no_grad():
        before = model(input_ids=ids, **routed).logits
        _frozen_swap(model, how)
        swapped = model(input_ids=ids, **routed).logits
    if how != "renamed":
        assert not torch.allclose(before, swapped)  # the swap matters: base + diff would not be this model
    with pytest.raises(ValueError, match="since convert"):
        hf.save_pretrained(model, tmp_path / "sft")
    assert not (tmp_path / "sft").exists()
    with pytest.raises(ValueError, match="since convert"):
        hf.extract_diff(model, **lang)
    # merge_and_unload keeps the module: the plain model it returns is the swapped one, whole
    with torch.no_grad():
        torch.testing.assert_close(hf.merge_and_unload(model, **lang)(input_ids=ids).logits, swapped)


@pytest.mark.parametrize("arch", ["bert", "xlmr"])
@pytest.mark.parametrize("kind", ["delta", "subnetwork"])
@pytest.mark.parametrize("untied", [False, True])
def test_a_tied_model_loaded_with_assign_saves_and_extracts(arch, kind, untied, tmp_path):
    # load_state_dict(assign=True) gives each name of a tied tensor (the decoder and the word
    # embeddings) a Parameter of its own: the second name read as a module added since convert, and
    # save_pretrained and extract_diff refused an unchanged model naming "(added)" entries
    base = tiny(arch)
    g = torch.Generator().manual_seed(0)
    masks = {"de": {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.3
                    for n in hf.model.target_names(base)}}
    model = (hf.convert(copy.deepcopy(base), density=0.05) if kind == "delta"
             else hf.convert(copy.deepcopy(base), kind="subnetwork", masks=masks))
    with torch.no_grad():  # as if trained
        for name, layer in hf.model._converted(model):
            if kind == "delta":
                layer.delta_values.normal_(generator=g)
            else:
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * masks["de"][f"{name}.weight"])
    state = model.state_dict()
    if untied:  # each name its own tensor, of equal values (a state dict that does not share storage)
        state = {k: v.clone() for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    ids = batch()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        plain = copy.deepcopy(base)
        with hf.extract_diff(model).applied(plain):
            torch.testing.assert_close(plain(input_ids=ids).logits, want)
        if kind == "delta":
            hf.save_pretrained(model, tmp_path / "sft")
            torch.testing.assert_close(hf.from_pretrained(copy.deepcopy(base), tmp_path / "sft")(input_ids=ids).logits,
                                       want, rtol=0, atol=0)
        model.get_output_embeddings().weight[5, 0] += 1.0  # a frozen value that did change is still refused
    with pytest.raises(ValueError, match="changed since convert"):
        hf.extract_diff(model)


def test_extract_diff_of_a_model_built_by_hand_refuses_a_delta_it_does_not_read():
    # A SparseDeltaEmbedding's delta_values passed the check by name: extract_diff returned the
    # linear delta alone, and the embedding's 20 trained entries were missing from base + diff.
    from xlsparse.nn import SparseDeltaEmbedding

    model = tiny("llama").requires_grad_(False)
    model.model.layers[0].mlp.up_proj = SparseDeltaLinear.from_linear(model.model.layers[0].mlp.up_proj, k=10)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.delta_values.fill_(0.5)
    assert list(hf.extract_diff(model).deltas) == ["model.layers.0.mlp.up_proj.weight"]
    model.model.embed_tokens = SparseDeltaEmbedding.from_embedding(model.model.embed_tokens, k=20)
    with torch.no_grad():
        model.model.embed_tokens.delta_values.fill_(1.0)
    with pytest.raises(ValueError, match=r"extract_diff: \['model.embed_tokens.delta_values'\] are trainable"):
        hf.extract_diff(model)


def test_sparse_delta_linear_under_autocast_matches_the_plain_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    layer = SparseDeltaLinear.from_linear(lin, density=0.3)
    with torch.no_grad():
        layer.delta_values.normal_(0, 0.2)
    merged = torch.nn.Linear(16, 12)
    with torch.no_grad():
        merged.weight.copy_(lin.weight)
        merged.weight.view(-1)[layer.delta_indices.long()] += layer.delta_values
        merged.bias.copy_(lin.bias)
    _autocast_pair(layer, merged, torch.randn(3, 5, 16))
    assert layer.delta_values.grad.dtype == torch.float32
    expect = merged.weight.grad.view(-1)[layer.delta_indices.long()]
    torch.testing.assert_close(layer.delta_values.grad, expect, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("tokens", [5, 100])  # an SpMM term and Δ written into W0 without autocast
@pytest.mark.parametrize("grad", [True, False])
def test_sparse_delta_linear_under_autocast_rounds_the_merged_weight_once(tokens, grad):
    # autocast rounds a merged nn.Linear's W0 + Δ to bf16 once; W0 and Δ were cast apart and
    # summed in bf16, up to one bf16 step off at the delta's entries
    torch.manual_seed(2)
    lin = torch.nn.Linear(64, 48)
    layer = SparseDeltaLinear.from_linear(lin, density=0.5)
    with torch.no_grad():
        layer.delta_values.copy_(torch.randn(layer.delta_values.shape) * 3e-3)  # small: rounding shows
    merged = torch.nn.Linear(64, 48)
    with torch.no_grad():
        merged.weight.copy_(lin.weight)
        merged.weight.view(-1)[layer.delta_indices.long()] += layer.delta_values
        merged.bias.copy_(lin.bias)
    x = torch.randn(tokens, 64)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), merged(x)
    assert torch.equal(got, want)
    if grad:
        got.float().square().sum().backward()
        want.float().square().sum().backward()
        torch.testing.assert_close(layer.delta_values.grad, merged.weight.grad.view(-1)[layer.delta_indices.long()],
                                   rtol=2e-2, atol=2e-2)


def test_multi_delta_and_subnetwork_linear_under_autocast():
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 12)
    delta = xlsparse.SparseDelta(torch.tensor([0, 5, 40]), torch.tensor([0.3, -0.2, 0.5]), (12, 16))
    multi = MultiDeltaLinear.from_linear(lin, {"a": delta})
    merged = torch.nn.Linear(16, 12)
    with torch.no_grad():
        merged.weight.copy_(lin.weight + delta.to_dense())
        merged.bias.copy_(lin.bias)
    x = torch.randn(2, 4, 16)

    class Routed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, route=torch.zeros(x.shape[:-1], dtype=torch.long))

    _autocast_pair(Routed(multi), merged, x)
    sub = SubnetworkLinear.from_linear(copy.deepcopy(lin), {"a": torch.rand(12, 16) < 0.5})
    plain = copy.deepcopy(lin)

    class Ided(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x, language_ids=torch.zeros(x.shape[0], dtype=torch.long))

    _autocast_pair(Ided(sub), plain, x)
    assert sub.weight.grad.dtype == torch.float32
    torch.testing.assert_close(sub.weight.grad, plain.weight.grad * sub.masks[0], rtol=3e-2, atol=3e-2)


def test_trainer_bf16_trains_a_converted_model():
    datasets = pytest.importorskip("datasets")
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(3, VOCAB, (16, 6), generator=g).tolist(),
            "labels": torch.randint(0, 3, (16,), generator=g).tolist()}
    args = transformers.TrainingArguments(output_dir="/tmp/xlsparse-bf16-test", max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, bf16=True, save_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows)).train()
    assert any(torch.count_nonzero(m.delta_values) > 0 for m in model.modules() if isinstance(m, SparseDeltaLinear))


def test_trainer_folders_of_a_converted_model_load_with_from_pretrained(tmp_path):
    # The Trainer saves through transformers' save_pretrained: the whole model, whose class drops the
    # deltas on load. The converted model's save_pretrained adds the xlsparse files beside it.
    datasets = pytest.importorskip("datasets")
    model, head = classifier("bert")
    base = copy.deepcopy(model)
    hf.convert(model, density=0.1, modules_to_save=[head])
    g = torch.Generator().manual_seed(0)
    rows = {"input_ids": torch.randint(3, VOCAB, (16, 6), generator=g).tolist(),
            "labels": torch.randint(0, 3, (16,), generator=g).tolist()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="steps",
                                          save_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    ids = batch(3, 6)
    want = model.eval()(input_ids=ids).logits
    assert not torch.equal(want, base(input_ids=ids).logits)
    for folder in ("final", "run/checkpoint-2"):
        assert os.path.isfile(tmp_path / folder / "model.safetensors")  # what a resume reads
        loaded = hf.from_pretrained(copy.deepcopy(base), str(tmp_path / folder))
        assert torch.equal(loaded(input_ids=ids).logits, want)
    multi = _multi()
    multi.save_pretrained(str(tmp_path / "multi"))
    again = hf.from_pretrained(tiny("llama"), str(tmp_path / "multi"))
    langs = torch.tensor([1, 0, -1])
    assert torch.equal(again.eval()(input_ids=ids, language_ids=langs).logits,
                       multi.eval()(input_ids=ids, language_ids=langs).logits)
    hf.merge_and_unload(model).save_pretrained(str(tmp_path / "merged"))  # transformers' own save again
    assert not os.path.exists(tmp_path / "merged" / "xlsparse_config.json")


def test_a_failed_xlsparse_save_leaves_no_earlier_diff_in_the_folder(tmp_path):
    model, head = classifier("bert")
    base = copy.deepcopy(model)
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.save_pretrained(str(tmp_path))
    hf.from_pretrained(copy.deepcopy(base), str(tmp_path))  # the first save loads
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(0.01)  # outside the diff: base + diff is no longer the model
    with pytest.warns(UserWarning, match="holds transformers' files only"):
        model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("xlsparse")]
    with pytest.raises(FileNotFoundError, match="xlsparse_config.json does not exist"):
        hf.from_pretrained(copy.deepcopy(base), str(tmp_path))


def test_a_model_save_that_fails_writing_the_diff_leaves_no_earlier_diff_beside_its_files(tmp_path, monkeypatch):
    # hf.save_pretrained keeps an earlier save whole when its own write fails (a full disk); under
    # model.save_pretrained transformers' files were already this model's, and the earlier diff beside
    # them loaded as this model's (with its head), silently
    model, head = classifier("bert")
    base = copy.deepcopy(model)
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        model.get_submodule(head).weight.add_(1.0)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xlsparse.SparseDiff, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("xlsparse")]


def test_a_save_leaves_no_earlier_save_s_language_files_in_the_folder(tmp_path):
    # a 'multi' save of fewer languages (or a 'delta' save) left the earlier save's
    # xlsparse_diff.lang<i>.safetensors beside its own files, where they passed for this model's
    base = tiny("bert")
    three = hf.convert(copy.deepcopy(base), kind="multi",
                       diffs={lang: random_diff(base, 7, 0.1, seed=e) for e, lang in enumerate(["de", "fr", "it"])})
    hf.save_pretrained(three, str(tmp_path))
    assert os.path.isfile(tmp_path / "xlsparse_diff.lang2.safetensors")
    two = hf.convert(copy.deepcopy(base), kind="multi",
                     diffs={lang: random_diff(base, 7, 0.1, seed=5 + e) for e, lang in enumerate(["de", "fr"])})
    hf.save_pretrained(two, str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("xlsparse")) == [
        "xlsparse_config.json", "xlsparse_diff.lang0.safetensors", "xlsparse_diff.lang1.safetensors",
        "xlsparse_diff.safetensors"]
    assert hf.model.languages(hf.from_pretrained(copy.deepcopy(base), str(tmp_path))) == ["de", "fr"]
    hf.save_pretrained(hf.convert(copy.deepcopy(base), density=0.1), str(tmp_path))
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("xlsparse")) == [
        "xlsparse_config.json", "xlsparse_diff.safetensors"]


def test_a_subnetwork_save_leaves_no_earlier_diff_in_the_folder(tmp_path):
    # a 'subnetwork' model's save writes transformers' files only; an earlier 'delta' save's diff in
    # the folder (a reused Trainer output_dir) stayed, and from_pretrained loaded it as this model
    model, head = classifier("bert")
    base = copy.deepcopy(model)
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.save_pretrained(str(tmp_path))
    masks = {"de": {f"{n}.weight": torch.ones(base.get_submodule(n).weight.shape, dtype=torch.bool)
                    for n in hf.model.target_names(base)[:2]}}
    sub = hf.convert(copy.deepcopy(base), kind="subnetwork", masks=masks)
    sub.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("xlsparse")]
    with pytest.raises(FileNotFoundError, match="xlsparse_config.json does not exist"):
        hf.from_pretrained(copy.deepcopy(base), str(tmp_path))


def test_save_pretrained_with_push_to_hub_uploads_the_xlsparse_files(tmp_path, monkeypatch):
    # transformers uploads inside its own save_pretrained, before xlsparse's files were written:
    # the hub got the model without its diff. No network here: the hub calls are stood in for.
    import transformers.utils.hub as hub

    uploads = []
    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda self, repo_id, **kw: type(
        "Repo", (), {"repo_id": repo_id})()})())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **kw: type("Card", (), {
        "save": lambda self, path: open(path, "w").close()})())
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files",
                        lambda self, folder, repo_id, *a, **kw: uploads.append((repo_id, sorted(os.listdir(folder)))))
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    model.save_pretrained(str(tmp_path / "sft"), push_to_hub=True, repo_id="me/sft")
    assert [repo for repo, _ in uploads] == ["me/sft"]
    assert {"xlsparse_config.json", "xlsparse_diff.safetensors", "model.safetensors"} <= set(uploads[0][1])
    assert {"xlsparse_config.json", "xlsparse_diff.safetensors"} <= set(os.listdir(tmp_path / "sft"))


@pytest.mark.slow  # torch.compile: ~13 s each
def test_a_routed_llama_compiles_with_one_graph_break():
    model = _multi("llama")
    ids, lang = batch(4, 3), torch.tensor([0, 1, -1, 1])

    def forward(ids, lang):
        return model(input_ids=ids, language_ids=lang).logits

    explained = torch._dynamo.explain(forward)(ids, lang)
    assert explained.graph_break_count <= 1, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="eager")
    torch.testing.assert_close(compiled(ids, lang), forward(ids, lang))
    torch._dynamo.reset()


def test_a_route_routes_only_its_own_model():
    # The routing was one per-thread stack: a second routed model with as many languages, run
    # inside `route(a, ids)`, was silently routed by a's ids.
    a, b = _multi("bert"), _multi("bert")
    with torch.no_grad():
        b.bert.encoder.layer[0].attention.self.query.delta_values[1].add_(1.0)  # b differs from a
        ids = batch(2, 5)
        with hf.route(a, [1, 1]):
            expect_a = a(ids).logits
            with pytest.raises(RuntimeError, match="another model"):
                b(ids)
        with hf.route(a, [1, 1]), hf.route(b, [0, 0]):  # nested: each by its own ids
            torch.testing.assert_close(a(ids).logits, expect_a, rtol=0, atol=0)
        with hf.route(b, [0, 0]):
            expect_b = b(ids).logits
        with hf.route(b, [0, 0]), hf.route(a, [1, 1]):
            torch.testing.assert_close(b(ids).logits, expect_b, rtol=0, atol=0)


def test_generate_with_language_ids_routes_the_encoder_of_an_encoder_decoder_model(tmp_path):
    # generate() runs an encoder-decoder's encoder by itself, with its kwargs (language_ids among
    # them): the encoder must be routed as the decoder steps are, not run as the base model.
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = transformers.T5ForConditionalGeneration(cfg).eval()
    diffs = {lang: random_diff(base, 20, 1.0, seed) for lang, seed in (("de", 1), ("fr", 2))}
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    ids = batch(2, 6)
    gen = dict(max_new_tokens=5, do_sample=False, num_beams=2)
    for lang in ("de", "fr"):
        with xlsparse.apply([diffs[lang]], base):
            want = base.generate(ids, **gen)
        got = model.generate(ids, language_ids=torch.tensor([list(diffs).index(lang)] * 2), **gen)
        assert torch.equal(got, want), lang
    twin = copy.deepcopy(model)  # the encoder's routing survives a copy, and unloading removes it
    assert torch.equal(twin.generate(ids, language_ids=torch.tensor([1, 1]), **gen),
                       model.generate(ids, language_ids=torch.tensor([1, 1]), **gen))
    plain = hf.merge_and_unload(model, language="fr")
    assert "forward" not in plain.get_encoder().__dict__


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_the_base_model_of_a_routed_model_takes_language_ids(arch):
    # model.model / model.bert (hidden states) swallowed language_ids in its forward's **kwargs
    # and ran the base model for every language
    model = _multi(arch)
    inner, ids = model.base_model, batch(2, 5)
    assert inner is not model
    with hf.route(model, [1, -1]):
        want = inner(ids).last_hidden_state
    torch.testing.assert_close(inner(ids, language_ids=torch.tensor([1, -1])).last_hidden_state, want, rtol=0, atol=0)
    with hf.disable(model):
        assert not torch.allclose(inner(ids).last_hidden_state[0], want[0])
    plain = hf.merge_and_unload(model, language="fr")
    assert "forward" not in plain.base_model.__dict__


def _tiny_generator(arch):
    if arch != "t5":
        model = tiny(arch)
        model.generation_config.pad_token_id = 0
        return model
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_generate_routes_every_row_of_a_mixed_batch_by_its_own_language(arch):
    # generate repeats rows for beams and returned sequences and reorders beams every step: each
    # sequence must equal its row generated alone by the base with only its language merged in
    base = _tiny_generator(arch)
    diffs = {lang: random_diff(base, 200, 1.0, seed) for lang, seed in (("de", 1), ("fr", 2), ("sw", 3))}
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    ids, lang = batch(4, 5), torch.tensor([0, 2, -1, 1])
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :1] = 0  # left padding (its positions follow the mask)
    if arch == "t5":
        mask = mask.flip(1)  # an encoder's padding goes on the right
    ids = ids.masked_fill(mask == 0, 0)
    for gen in (dict(use_cache=False), dict(num_beams=3, num_return_sequences=2)):
        gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, **gen)
        n = gen.get("num_return_sequences", 1)
        got = model.generate(ids, attention_mask=mask, language_ids=lang, **gen)
        for row, e in enumerate(lang.tolist()):
            with xlsparse.apply([diffs[list(diffs)[e]]] if e >= 0 else [], base):
                want = base.generate(ids[row:row + 1], attention_mask=mask[row:row + 1], **gen)
            assert torch.equal(got[row * n:(row + 1) * n], want), (gen, row, e)


def test_generate_inside_route_with_beams_names_them():
    # route's ids cover the examples given; generate's beams repeat the rows under it
    model = _multi("gpt2")
    ids = batch(2, 5)
    with hf.route(model, ["de", "fr"]), pytest.raises(ValueError, match="num_beams.*language_ids=ids"):
        model.generate(ids, max_new_tokens=2, num_beams=2)


def test_generate_refuses_per_token_language_ids_before_the_first_step():
    # per-token ids fit the prompt's forward only: generate ran it, then raised at the second step,
    # whose input is the generated token
    model = _multi("gpt2")
    ids = batch(2, 5)
    per_token = torch.tensor([[0] * 5, [1] * 5])
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    with pytest.raises(ValueError, match=r"generate: language_ids of shape \[2, 5\].*one id per example"):
        model.generate(ids, language_ids=per_token, max_new_tokens=3, do_sample=False)
    with hf.route(model, per_token), pytest.raises(ValueError, match=r"shape \[2, 5\]"):
        model.generate(ids, max_new_tokens=3, do_sample=False)
    assert not calls  # refused before any forward


def test_generate_keeps_language_ids_where_the_class_prepares_its_own_inputs():
    # Flaubert's prepare_inputs_for_generation builds the step inputs afresh and dropped
    # language_ids: every generated row ran the base model, whatever its language
    torch.manual_seed(0)
    cfg = transformers.FlaubertConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64)
    base = transformers.FlaubertWithLMHeadModel(cfg).eval()
    diffs = {lang: random_diff(base, 300, 2.0, seed) for lang, seed in (("de", 1), ("fr", 2))}
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    ids, lang = batch(3, 5), torch.tensor([1, -1, 0])
    gen = dict(max_new_tokens=4, do_sample=False)
    for twin in (model, copy.deepcopy(model)):
        got = twin.generate(ids, language_ids=lang, **gen)
        for row, e in enumerate(lang.tolist()):
            with xlsparse.apply([diffs[list(diffs)[e]]] if e >= 0 else [], base):
                assert torch.equal(got[row:row + 1], base.generate(ids[row:row + 1], **gen)), (row, e)
    plain = hf.merge_and_unload(model, language="fr")
    assert "prepare_inputs_for_generation" not in plain.__dict__


def test_generate_keeps_language_ids_where_the_step_inputs_are_a_user_dict():
    # a prepare_inputs_for_generation returning a UserDict (a BatchEncoding), built afresh as
    # Flaubert's: only a dict got the ids back, and the first step raised that no routing was active
    from collections import UserDict

    torch.manual_seed(0)
    cfg = transformers.FlaubertConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64)
    base = transformers.FlaubertWithLMHeadModel(cfg).eval()
    diffs = {lang: random_diff(base, 300, 2.0, seed) for lang, seed in (("de", 1), ("fr", 2))}
    ids, lang = batch(2, 5), torch.tensor([1, 0])
    gen = dict(max_new_tokens=2, do_sample=False)
    want = []  # each row by the base with its language's diff applied
    for row, e in enumerate(lang.tolist()):
        with xlsparse.apply([diffs[list(diffs)[e]]], base):
            want.append(base.generate(ids[row:row + 1], **gen))

    def prepare(self, *args, **kwargs):
        return UserDict(type(base).prepare_inputs_for_generation(self, *args, **kwargs))

    model = copy.deepcopy(base)
    model.__class__ = type("Wrapped", (type(base),), {"prepare_inputs_for_generation": prepare})
    got = hf.convert(model, kind="multi", diffs=diffs).generate(ids, language_ids=lang, **gen)
    assert torch.equal(got, torch.cat(want))


def test_generate_refuses_guidance_scale_beside_language_ids():
    # classifier-free guidance runs the model a second time without the generate kwargs: that pass
    # ran the base model, and the routed rows' sequences differed from the language's own model
    base = tiny("gpt2")
    diffs = {lang: random_diff(base, 300, 2.0, seed) for lang, seed in (("de", 1), ("fr", 2))}
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    ids, gen = batch(2, 5), dict(max_new_tokens=6, do_sample=False, guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        model.generate(ids, language_ids=torch.tensor([1, 1]), **gen)
    with xlsparse.apply([diffs["fr"]], base):
        want = base.generate(ids, **gen)
    with hf.route(model, ["fr", "fr"]):  # the way that routes the second pass too
        assert torch.equal(model.generate(ids, **gen), want)


def test_generate_repeats_language_names_for_each_beam():
    # generate repeats tensors only: names in a list were not repeated for the beams
    model = _multi("gpt2")
    ids, gen = batch(3, 5), dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    want = model.generate(ids, language_ids=torch.tensor([1, -1, 0]), **gen)
    assert torch.equal(model.generate(ids, language_ids=["fr", None, "de"], **gen), want)


def test_a_merged_model_deep_copies_and_pickles(tmp_path):
    # a copy's delta_values has a fresh version counter: the copy of a merged model must still run,
    # and the copy of a stale merge (delta changed after merge()) must still refuse
    model, head = classifier("bert")
    hf.convert(model, density=0.1, modules_to_save=[head])
    _train(model)
    hf.merge(model)
    ids = batch(2, 5)
    want = model(input_ids=ids).logits
    torch.save(model, tmp_path / "model.pt")
    for twin in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert torch.equal(twin(input_ids=ids).logits, want)
        hf.unmerge(twin)
    layer = next(m for m in model.modules() if isinstance(m, SparseDeltaLinear))
    with torch.no_grad():
        layer.delta_values.add_(1.0)
    with pytest.raises(RuntimeError, match="changed after merge"):
        copy.deepcopy(model)(input_ids=ids)


def test_a_merged_model_under_accelerates_offload_refuses_rather_than_run_the_base():
    # cpu_offload keeps the model's state dict, whose weights are W0 while merged, and swaps them in
    # at each call: the merged layers multiplied by W0 alone (0.48 off), silently
    accelerate = pytest.importorskip("accelerate")
    model = hf.convert(tiny("llama"), density=0.1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    ids = batch(2, 5)
    expect = model(input_ids=ids).logits
    unmerged = copy.deepcopy(model)
    hf.merge(model)
    for offloaded in (model, unmerged):
        accelerate.cpu_offload(offloaded, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="another weight than the one merge"):
        model(input_ids=ids)
    torch.testing.assert_close(unmerged(input_ids=ids).logits, expect)  # the unmerged layers add Δ


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_a_model_loaded_under_inference_mode_merges_and_unmerges(where, tmp_path):
    # from_pretrained under torch.inference_mode() makes the deltas inference tensors, which keep no
    # version counter: merge() read it after writing W0 + Δ into the first layer and raised
    # ("Inference tensors do not track version counter"), leaving that layer merged half-way
    base = tiny("gpt2")
    model = hf.convert(copy.deepcopy(base), density=0.1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("delta_values"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    hf.save_pretrained(model, tmp_path / "sft")
    ids = batch(2, 5)
    with torch.no_grad():  # merged as `loaded` will be: merge_and_unload's Conv1D is another GEMM (2 threads: other bits)
        reference = copy.deepcopy(model)
        hf.merge(reference)
        want = reference(input_ids=ids).logits
    with torch.inference_mode():
        loaded = hf.from_pretrained(copy.deepcopy(base), tmp_path / "sft", is_trainable=False)
    weights = {n: _bits(p) for n, p in loaded.named_parameters() if n.endswith(".weight")}
    with torch.inference_mode() if where == "inside" else torch.no_grad():
        hf.merge(loaded)
        assert torch.equal(loaded(input_ids=ids).logits, want)
        twin = copy.deepcopy(loaded)
        assert torch.equal(twin(input_ids=ids).logits, want)
        layer = next(m for m in loaded.modules() if isinstance(m, SparseDeltaLinear))
        with torch.inference_mode():  # an inference tensor changes in place only there
            layer.delta_values.add_(1.0)
        with pytest.raises(RuntimeError, match="changed after merge"):  # a stale merge still refuses
            loaded(input_ids=ids)
        with torch.inference_mode():
            layer.delta_values.sub_(1.0)
        hf.unmerge(loaded)
    assert all(torch.equal(_bits(p), weights[n]) for n, p in loaded.named_parameters() if n in weights)


@pytest.mark.parametrize("kind", ["delta", "multi"])
def test_merge_and_unload_of_float32_deltas_over_a_bfloat16_base(kind):
    # trainable parameters upcast to float32 over a bfloat16 base (PEFT's mixed-precision habit; the
    # layers run them under autocast): merge_and_unload raised in sparse_axpy_ on the dtypes. The
    # plain weight is W0 + Δ rounded to bfloat16 as merge() writes it: Δ in bfloat16, summed in float32
    base = tiny("bert").to(torch.bfloat16)
    if kind == "delta":
        model = hf.convert(copy.deepcopy(base), density=0.1)
    else:
        diffs = {lang: random_diff(tiny("bert"), 9, 0.1, s) for s, lang in enumerate(["de", "fr"])}
        model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    g = torch.Generator().manual_seed(4)
    for p in model.parameters():
        if p.requires_grad:
            p.data = 0.01 * torch.randn(p.shape, generator=g)  # float32
    layers = {n: (m.delta_indices, m.delta_values) if kind == "delta" else (m.delta_indices[1], m.delta_values[1])
              for n, m in hf.model._converted(model)}
    plain = hf.merge_and_unload(model, **({} if kind == "delta" else {"language": "fr"}))
    for name, (idx, values) in layers.items():
        expect = base.get_submodule(name).weight.detach().float().reshape(-1).clone()
        expect[idx.long()] += values.detach().to(torch.bfloat16).float()
        got = plain.get_submodule(name).weight
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.reshape(-1), expect.to(torch.bfloat16)), name


def test_merge_and_unload_of_a_merged_layer_whose_delta_trained_after_merge_keeps_the_trained_delta():
    # README: a merged layer in eval mode with grad enabled still gives Δ its gradient, so a step can
    # change Δ after merge(); merge_and_unload must then give W0 + the current Δ, not the stale merge
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    hf.convert(model, density=0.5)
    with torch.no_grad():
        for layer in (model[0], model[1]):
            layer.delta_values.normal_()
    hf.merge(model)
    model.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    want = []
    for layer in (model[0], model[1]):
        w = layer.base_weight().clone()
        w.view(-1)[layer.delta_indices.long()] += layer.delta_values.detach()
        want.append(w)
    plain = hf.merge_and_unload(model)
    torch.testing.assert_close(plain[0].weight, want[0], rtol=0, atol=0)
    torch.testing.assert_close(plain[1].weight, want[1], rtol=0, atol=0)


def test_an_apply_over_a_merged_layers_delta_entries_is_not_dropped_by_state_dict_or_extract_diff():
    # the model computes W0 + Δ + A; state_dict() put W0 back at Δ's entries (dropping A there) and
    # extract_diff returned Δ alone without the "changed since convert" error it gives unmerged
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    hf.convert(model, density=0.5)
    layer = model[0]
    with torch.no_grad():
        layer.delta_values.normal_()
    hf.merge(model)
    idx = layer.delta_indices[:3].long()
    A = xlsparse.SparseDiff({"0.weight": xlsparse.SparseDelta(idx, torch.ones(3), (5, 6))})
    handle = xlsparse.apply([A], model)
    with pytest.raises(ValueError, match="changed since convert"):
        hf.extract_diff(model)
    with pytest.raises(RuntimeError, match="changed at the delta's entries since merge"):
        model.state_dict()
    handle.revert()  # with the apply reverted, both work again
    assert hf.extract_diff(model).nnz == layer.delta_indices.numel()
    fresh = torch.nn.Sequential(torch.nn.Linear(6, 5))
    hf.convert(fresh, density=0.5)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 6)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_hf_unmerge_refusing_one_layer_leaves_every_layer_merged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    hf.convert(model, density=0.5)
    with torch.no_grad():
        model[0].delta_values.normal_()
        model[2].delta_values.normal_()
    hf.merge(model)
    idx = model[2].delta_indices[:1].long()
    handle = xlsparse.apply([xlsparse.SparseDiff({"2.weight": xlsparse.SparseDelta(idx, torch.ones(1), (3, 4))})], model)
    w0 = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError, match="unmerge"):
        hf.unmerge(model)
    assert model[0].merged and model[2].merged and torch.equal(model[0].weight, w0)
    handle.revert()
    hf.unmerge(model)
    assert not model[0].merged and not model[2].merged


def test_reverting_inside_disable_an_apply_made_before_it_on_a_saved_module_is_refused():
    # the revert reported success, but disable's exit copied the kept values (the diff included) back
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    hf.convert(model, target_modules=["0"], density=0.5, modules_to_save=["2"])
    before = model[2].weight.detach().clone()
    diff = xlsparse.SparseDiff({"2.weight": xlsparse.SparseDelta(torch.tensor([0, 4]), torch.tensor([1.0, -1.0]), (2, 3))})
    handle = xlsparse.apply([diff], model)
    with hf.disable(model):
        with pytest.raises(RuntimeError, match="hf.disable"):
            handle.revert()
    assert not handle.reverted
    handle.revert()  # after the block it reverts
    assert torch.equal(model[2].weight, before)


def test_an_apply_made_inside_disable_whose_handle_is_dropped_is_reverted_on_exit_too():
    # the docstring: changes made inside the block are not kept; a dropped handle's apply stayed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    hf.convert(model, density=0.5)
    with torch.no_grad():
        model[0].delta_values.normal_()
    x = torch.randn(2, 4)
    with torch.no_grad():
        trained = model(x)
    weight = model[0].weight.detach().clone()
    diff = xlsparse.SparseDiff({"0.weight": xlsparse.SparseDelta(torch.tensor([1, 5]), torch.tensor([1.0, 2.0]), (3, 4))})
    with hf.disable(model):
        xlsparse.apply([diff], model)  # no handle kept
    assert torch.equal(model[0].weight, weight)
    with torch.no_grad():
        assert torch.equal(model(x), trained)
    hf.extract_diff(model)  # nothing outside the diff changed


def test_an_apply_made_inside_disable_on_a_buffer_is_reverted_on_exit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    hf.convert(model, target_modules=["0"], density=0.5)
    before = model[1].running_mean.clone()
    diff = xlsparse.SparseDiff({"1.running_mean": xlsparse.SparseDelta(torch.tensor([0]), torch.tensor([3.0]), (3,))})
    with hf.disable(model):
        handle = xlsparse.apply([diff], model)
    assert handle.reverted
    assert torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("kind", ["delta", "multi", "subnetwork"])
def test_saving_inside_disable_is_refused_and_writes_nothing(tmp_path, kind):
    """Inside `hf.disable` the modules to save (and the subnetworks' trained entries) hold their
    values from convert: a save or extract_diff made there wrote those, and the folder reloaded to
    a model with the base's head, without a word; merge_and_unload there merged them (for good on
    GPT-2, whose plain layers are transposed copies)."""
    model, head = classifier("bert")
    ids = batch()
    if kind == "delta":
        hf.convert(model, density=0.2, modules_to_save=[head])
    elif kind == "multi":
        hf.convert(model, kind="multi", diffs={"de": random_diff(classifier("bert")[0], 5, 0.0, seed=1)},
                   modules_to_save=[head])
    else:
        names = [f"{n}.weight" for n in hf.model.target_names(model)]
        named = dict(model.named_parameters())
        hf.convert(model, kind="subnetwork", masks={"de": {n: torch.rand(named[n].shape) < 0.3 for n in names}},
                   modules_to_save=[head])
    g = torch.Generator().manual_seed(5)
    opt = xlsparse.optim.MaskedAdamW([p for p in model.parameters() if p.requires_grad], [None] * sum(
        p.requires_grad for p in model.parameters()), lr=1e-2) if kind != "subnetwork" else None
    if kind == "subnetwork":
        layers = {f"{n}.weight": m for n, m in hf.model._converted(model, SubnetworkLinear)}
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = xlsparse.optim.MaskedAdamW(list(params.values()), [layers[n].trainable_mask() if n in layers else None
                                                                 for n in params], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        with hf.route(model, [0] * 4) if kind != "delta" else torch.enable_grad():
            model(input_ids=torch.randint(3, VOCAB, (4, 6), generator=g), labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        opt.step()
    model.eval()
    want = hf.extract_diff(model, language="de" if kind == "multi" else None)
    with hf.disable(model):
        with pytest.raises(RuntimeError, match="hf.disable"):
            hf.extract_diff(model, language="de" if kind == "multi" else None)
        with pytest.raises(RuntimeError, match="merge_and_unload.*hf.disable"):  # it merged the base's values
            hf.merge_and_unload(model, language="de" if kind == "multi" else None)
        if kind != "subnetwork":
            with pytest.raises(RuntimeError, match="hf.disable"):
                hf.save_pretrained(model, str(tmp_path / "a"))
        with pytest.raises(RuntimeError, match="hf.disable"):  # transformers' own files (a Trainer's checkpoint)
            model.save_pretrained(str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    model.save_pretrained(str(tmp_path / "b"))  # after the block: the trained weights
    reloaded = type(model).from_pretrained(str(tmp_path / "b")).eval()
    assert torch.equal(reloaded.get_submodule(head).weight, model.get_submodule(head).weight)
    got = hf.extract_diff(model, language="de" if kind == "multi" else None)  # after the block: the trained state
    for name, t in want.absolute.items():
        assert torch.equal(got.absolute[name], t), name


def test_a_multi_model_holds_its_own_copy_of_the_diffs_indices():
    # MultiDeltaLinear registered the diff's own index tensors as its buffers: load_state_dict
    # (a Trainer resume) wrote them in place, which moved the support of the caller's SparseDiff
    # and of every other model converted from it (its logits moved by 0.43)
    base = tiny("llama")
    diffs = {lang: random_diff(base, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    kept = {lang: {n: d.indices.clone() for n, d in diff.deltas.items()} for lang, diff in diffs.items()}
    first = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    second = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    other = hf.convert(copy.deepcopy(base), kind="multi",
                       diffs={lang: random_diff(base, 20, 0.3, seed=7 + e) for e, lang in enumerate(["de", "fr"])})
    ids, langs = batch(2, 5), torch.tensor([0, 1])
    with torch.no_grad():
        want = second(input_ids=ids, language_ids=langs).logits
        first.load_state_dict(other.state_dict())
        assert torch.equal(first(input_ids=ids, language_ids=langs).logits, other(input_ids=ids, language_ids=langs).logits)
        assert torch.equal(second(input_ids=ids, language_ids=langs).logits, want)
    for lang, diff in diffs.items():
        for n, d in diff.deltas.items():
            assert torch.equal(d.indices, kept[lang][n]), (lang, n)


@pytest.mark.parametrize("kind", ["delta", "multi", "embedding"])
def test_a_state_dict_with_a_deltas_values_but_not_its_indices_is_refused(kind):
    # the trainable parameters alone, loaded with strict=False into a model converted afresh: the
    # values went onto the new model's own random support (10% shared at density 0.1), silently
    base = tiny("bert")
    torch.manual_seed(1)
    if kind == "multi":
        convert = lambda seed: hf.convert(copy.deepcopy(base), kind="multi", diffs={
            lang: random_diff(base, 20, 0.3, seed=seed + e) for e, lang in enumerate(["de", "fr"])})
    elif kind == "delta":
        convert = lambda seed: hf.convert(copy.deepcopy(base), density=0.1)
    else:
        convert = lambda seed: xlsparse.nn.SparseDeltaEmbedding.from_embedding(
            copy.deepcopy(base.bert.embeddings.word_embeddings), density=0.1)
    trained = convert(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "delta_values" in n:
                p.normal_()
    values = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    indices = {n: t for n, t in trained.state_dict().items() if "delta_indices" in n}
    fresh = convert(5)
    before = {n: t.clone() for n, t in fresh.state_dict().items()}
    for partial in (values, indices):
        with pytest.raises(ValueError, match="delta_indices.*delta_values|delta_values.*delta_indices"):
            fresh.load_state_dict(partial, strict=False)
    assert all(torch.equal(t, before[n]) for n, t in fresh.state_dict().items())
    fresh.load_state_dict(values | indices, strict=False)  # both: the trained delta, where it trained
    assert all(torch.equal(t, trained.state_dict()[n]) for n, t in fresh.state_dict().items() if "delta_" in n)


def test_a_multi_state_dict_refuses_a_model_with_the_languages_in_another_order():
    # The deltas are stored by id: a model converted with {"fr", "de"} took the German delta as
    # French and the French as German from a {"de", "fr"} state dict (a Trainer resume), silently
    base = tiny("bert")
    diffs = {lang: random_diff(base, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    saved = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs).state_dict()
    swapped = hf.convert(copy.deepcopy(base), kind="multi", diffs={"fr": diffs["fr"], "de": diffs["de"]})
    before = {n: t.clone() for n, t in swapped.state_dict().items()}
    with pytest.raises(ValueError, match=r"languages \['de', 'fr'\].*\['fr', 'de'\]"):
        swapped.load_state_dict(saved)
    name = next(n for n, m in swapped.named_modules() if isinstance(m, xlsparse.nn.MultiDeltaLinear))
    assert all(torch.equal(t, before[n]) for n, t in swapped.state_dict().items() if n.startswith(name + "."))
    same = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    assert not same.load_state_dict(saved).unexpected_keys
    older = {n: t for n, t in saved.items() if not n.endswith(".language_names")}  # saved before the names
    swapped.load_state_dict(older)


def test_functional_call_with_a_multi_state_dict_runs_it_and_refuses_another_order():
    # functional_call sets every key of the state dict on its module: `language_names`, a property
    # without a setter, raised AttributeError; the deltas it swaps in are stored by id
    base = tiny("llama")
    diffs = {lang: random_diff(base, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    model = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.25)
    ids, langs = batch(2, 5), torch.tensor([1, 0])
    kwargs = {"input_ids": ids, "language_ids": langs}
    got = torch.func.functional_call(model, trained.state_dict(), (), kwargs).logits
    assert torch.equal(got, trained(**kwargs).logits)
    expect = model(**kwargs).logits  # functional_call put its own tensors back
    assert not torch.equal(expect, got)
    swapped = hf.convert(copy.deepcopy(base), kind="multi", diffs={"fr": diffs["fr"], "de": diffs["de"]})
    with pytest.raises(ValueError, match=r"functional_call: .*languages \['de', 'fr'\].*\['fr', 'de'\]"):
        torch.func.functional_call(swapped, trained.state_dict(), (), kwargs)
    assert torch.equal(swapped(input_ids=ids, language_ids=torch.tensor([0, 1])).logits, expect)


def test_a_multi_model_round_trips_through_distributed_checkpoint_and_refuses_another_order(tmp_path):
    # torch.distributed.checkpoint's get_model_state_dict looks every key up on its module:
    # `language_names` was no attribute, so it raised AttributeError on any 'multi' model
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    base = tiny("bert")
    diffs = {lang: random_diff(base, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    trained = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.25)
    save(get_model_state_dict(trained), checkpoint_id=str(tmp_path))
    loaded = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    state = get_model_state_dict(loaded)
    load(state, checkpoint_id=str(tmp_path))
    set_model_state_dict(loaded, state)
    assert all(torch.equal(t, trained.state_dict()[n]) for n, t in loaded.state_dict().items())
    swapped = hf.convert(copy.deepcopy(base), kind="multi", diffs={"fr": diffs["fr"], "de": diffs["de"]})
    state = get_model_state_dict(swapped)
    load(state, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match=r"languages \['de', 'fr'\].*\['fr', 'de'\]"):
        set_model_state_dict(swapped, state)


def test_a_refused_multi_load_changes_nothing(tmp_path):
    # the order was checked by each layer as torch reached it: the embeddings (and any layer before
    # the first routed one) had taken the refused state dict's values already
    from torch.distributed.checkpoint import load, save
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    base = tiny("bert")
    diffs = {lang: random_diff(base, 20, 0.3, seed=e) for e, lang in enumerate(["de", "fr"])}
    trained = hf.convert(copy.deepcopy(base), kind="multi", diffs=diffs)
    with torch.no_grad():
        for t in trained.state_dict().values():
            if t.is_floating_point():
                t.add_(0.25)  # every weight differs from the model it is loaded into
    save(get_model_state_dict(trained), checkpoint_id=str(tmp_path))
    swapped = hf.convert(copy.deepcopy(base), kind="multi", diffs={"fr": diffs["fr"], "de": diffs["de"]})
    before = {n: t.clone() for n, t in swapped.state_dict().items()}

    def unchanged():
        return [n for n, t in swapped.state_dict().items() if not torch.equal(t, before[n])]

    with pytest.raises(ValueError, match="languages"):
        swapped.load_state_dict(trained.state_dict())
    assert unchanged() == []
    # a distributed checkpoint read into a state dict of its own, then set
    state = {n: t.clone() for n, t in get_model_state_dict(swapped).items()}
    load(state, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="languages"):
        set_model_state_dict(swapped, state)
    assert unchanged() == []
    # the names alone, read first: the check without reading the weights into the model
    names = {n: t for n, t in get_model_state_dict(swapped).items() if n.endswith(".language_names")}
    load(names, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match="languages"):
        swapped.load_state_dict(names, strict=False)
    assert unchanged() == []
    hf.merge_and_unload(swapped, language="de")
    assert not swapped._load_state_dict_pre_hooks  # a plain model again, loading anything


def _convert_gpt2(base, kind: str, model=None, trained: bool = False):
    """A copy of GPT-2 `base` (or `model`) converted as `kind`, with fixed random diffs or masks;
    `trained`: a subnetwork's masked entries moved by 0.1, as if trained."""
    model = copy.deepcopy(base) if model is None else model
    if kind == "delta":
        return hf.convert(model, kind="delta", diffs=random_diff(base, 30, 0.3, seed=1))
    if kind == "multi":
        return hf.convert(model, kind="multi", diffs={lang: random_diff(base, 30, 0.3, seed=e)
                                                      for e, lang in enumerate(["de", "fr"])})
    g = torch.Generator().manual_seed(0)
    masks = {lang: {f"{n}.weight": torch.rand(base.get_submodule(n).weight.shape, generator=g) < 0.3
                    for n in hf.model.target_names(base)} for lang in ("de", "fr")}
    model = hf.convert(model, kind="subnetwork", masks=masks)
    if trained:
        with torch.no_grad():
            for _, layer in hf.model._converted(model):
                layer.weight.view(-1)[layer.trainable_mask().view(-1)] += 0.1
    return model


@pytest.mark.parametrize("kind", ["delta", "multi", "subnetwork"])
def test_a_converted_gpt2_state_dict_keeps_conv1d_layout(kind, tmp_path):
    # a converted Conv1D stores its weight [out, in]; its state dict held that layout, so the folder
    # of model.save_pretrained (and of the Trainer's checkpoints) loaded into GPT2LMHeadModel with
    # the square attn.c_proj silently transposed (logits 0.2 off), the others refused by shape
    base = tiny("gpt2")
    ids, langs = batch(2, 5), torch.tensor([0, 1])

    model = _convert_gpt2(base, kind, trained=True)
    shapes = {n: tuple(t.shape) for n, t in base.state_dict().items()}
    assert {n: tuple(t.shape) for n, t in model.state_dict().items() if n in shapes} == shapes
    model.save_pretrained(tmp_path)
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    want = hf.merge_and_unload(copy.deepcopy(model), **({"language": "de"} if kind == "multi" else {}))
    for name, t in (base if kind != "subnetwork" else want).state_dict().items():
        assert torch.equal(plain.state_dict()[name], t), name  # the base's weights, or the trained ones
    fresh = _convert_gpt2(base, kind)  # a resume: the state dict back into a converted model
    fresh.load_state_dict(model.state_dict())
    run = (lambda m: m(input_ids=ids, language_ids=langs).logits) if kind != "delta" else (lambda m: m(input_ids=ids).logits)
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))
    if kind == "delta":  # merged: the state dict holds W0 in the model's layout all the same
        hf.merge(model)
        assert torch.equal(model.state_dict()["transformer.h.0.attn.c_attn.weight"],
                           base.state_dict()["transformer.h.0.attn.c_attn.weight"])


@pytest.mark.parametrize("kind", ["delta", "multi", "subnetwork"])
def test_a_converted_gpt2_state_dict_in_the_older_layout_loads_untransposed(kind):
    # state dicts of converted GPT-2 models written before the Conv1D layout fix hold the converted
    # weights as stored, [out, in]; the load took every one for [in, out] and transposed it: the
    # square attn.c_proj silently (logits 0.22 off), the others refused with swapped shapes
    base = tiny("gpt2")
    ids, langs = batch(2, 5), torch.tensor([0, 1])

    model = _convert_gpt2(base, kind, trained=True)
    converted = {f"{n}.weight" for n, _ in hf.model._converted(model)}
    older = {n: (t.t().contiguous() if n in converted else t) for n, t in model.state_dict().items()}
    run = (lambda m: m(input_ids=ids, language_ids=langs).logits) if kind != "delta" else (lambda m: m(input_ids=ids).logits)
    fresh = _convert_gpt2(base, kind)
    with pytest.warns(UserWarning, match="h.1.attn.c_proj.weight is in the \\[out, in\\] layout"):
        fresh.load_state_dict(older)
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))
    # the current layout loads as before, without a warning, also from a bf16 copy
    fresh = _convert_gpt2(base, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(model.state_dict())
        _convert_gpt2(base, kind, copy.deepcopy(base).to(torch.bfloat16)).load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))
    # a square weight that matches this layer's in neither layout: its layout cannot be told
    other = _convert_gpt2(base, kind, tiny("gpt2", seed=3))
    before = other.transformer.h[0].attn.c_proj.weight.clone()
    with pytest.raises(RuntimeError, match="h.0.attn.c_proj.weight is a square .* neither layout") as err:
        other.load_state_dict(model.state_dict())
    assert "Missing key" not in str(err.value)
    assert torch.equal(other.transformer.h[0].attn.c_proj.weight, before)


def test_an_older_state_dict_of_square_conv1d_layers_only_is_not_loaded_transposed():
    # with only square layers converted (attn.c_proj) nothing refused by shape: the older [out, in]
    # weights loaded transposed without a word (logits 0.22 off)
    base = tiny("gpt2")
    diff = xlsparse.SparseDiff({n: d for n, d in random_diff(base, 30, 0.3, seed=1).deltas.items() if "attn.c_proj" in n})
    model = hf.convert(copy.deepcopy(base), target_modules=["attn.c_proj"], diffs=diff)
    older = {n: (t.t().contiguous() if n.endswith("attn.c_proj.weight") else t) for n, t in model.state_dict().items()}
    fresh = hf.convert(copy.deepcopy(base), target_modules=["attn.c_proj"], diffs=diff)
    with pytest.warns(UserWarning, match="layout of state dicts written before"):
        fresh.load_state_dict(older)
    ids = batch(2, 5)
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    # a symmetric weight (here zero) is the same in both layouts: it loads
    with torch.no_grad():
        base.transformer.h[0].attn.c_proj.weight.zero_()
    zero = hf.convert(copy.deepcopy(base), target_modules=["attn.c_proj"], diffs=diff)
    hf.convert(copy.deepcopy(base), target_modules=["attn.c_proj"], diffs=diff).load_state_dict(zero.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_square_conv1d_weight_trained_at_every_entry_reloads_in_its_own_layout(dtype):
    # a dense subnetwork mask trains every entry of attn.c_proj: its state dict equals the base at no
    # entry in its own layout and, by chance, at a few in the transposed one (3 AdamW steps in bf16:
    # 2 of 3 seeds). The layout with more equal entries won: a resume loaded the weight transposed
    # with a warning about an older layout (logits 0.11 off), or refused it in float32
    base = tiny("gpt2").to(dtype)
    names = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    masks = {"de": {f"{n}.weight": torch.ones(base.get_submodule(n).weight.shape, dtype=torch.bool) for n in names}}

    def convert():
        return hf.convert(copy.deepcopy(base), target_modules=names, kind="subnetwork", masks=masks).eval()

    model, g = convert(), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in names:
            w = model.get_submodule(n).weight  # stored [out, in]
            w0 = w.clone()
            w += (1e-3 * torch.randn(w.shape, generator=g).sign()).to(dtype)  # a small step at every entry
            for i, j in [(0, 1), (2, 5), (7, 3)]:  # trained values that equal base entries of the transposed layout
                w[j, i] = w0[i, j]
            assert bool((w != w0).all())
    ids, langs = batch(2, 5), torch.tensor([0, 0])
    run = lambda m: m(input_ids=ids, language_ids=langs).logits  # noqa: E731
    fresh = convert()  # a resume: the state dict back into a converted model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))
    converted = {f"{n}.weight" for n in names}  # the older [out, in] layout still loads, with its warning
    older = {n: (t.t().contiguous() if n in converted else t) for n, t in model.state_dict().items()}
    fresh = convert()
    with pytest.warns(UserWarning, match="h.0.attn.c_proj.weight is in the \\[out, in\\] layout"):
        fresh.load_state_dict(older)
    with torch.no_grad():
        assert torch.equal(run(fresh), run(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("size", [32, 768])
def test_a_square_conv1d_layer_trained_at_every_entry_tells_either_layout(dtype, size):
    # GPT-2's size: a 16-bit weight trained at every entry equals its base by chance at ~0.1% of the
    # entries of the wrong layout (hundreds), more than at the few it kept in its own: loaded transposed
    g = torch.Generator().manual_seed(0)
    layer = SparseDeltaLinear.from_linear(torch.nn.Linear(size, size, bias=False).to(dtype), k=1)
    layer.transposed = True  # as convert makes it for a GPT-2 Conv1D
    with torch.no_grad():
        layer.weight.copy_(torch.randn(size, size, generator=g) * 0.02)
    trained = layer.weight.detach() + (1e-3 * torch.randn(size, size, generator=g).sign()).to(dtype)
    assert bool((trained != layer.weight).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(layer._stored_from_state(trained.t().contiguous(), "w"), trained)  # the current layout
    with pytest.warns(UserWarning, match="older|\\[out, in\\] layout"):
        assert torch.equal(layer._stored_from_state(trained.clone(), "w"), trained)  # the older [out, in] one


def test_a_pruned_square_conv1d_weight_reloads_in_either_layout():
    # a pruned weight's zeros equal the base in both layouts: only the entries where the two layouts
    # differ may count, or 75% zeros left no layout clearly ahead
    base = tiny("gpt2")
    g = torch.Generator().manual_seed(0)
    names = ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with torch.no_grad():
        for n in names:
            base.get_submodule(n).weight.mul_(torch.rand(32, 32, generator=g) > 0.75)
    masks = {"de": {f"{n}.weight": torch.rand(32, 32, generator=g) < 0.1 for n in names}}

    def convert():
        return hf.convert(copy.deepcopy(base), target_modules=names, kind="subnetwork", masks=masks).eval()

    model = convert()
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            layer.weight.view(-1)[layer.trainable_mask().view(-1)] += 0.01
    converted = {f"{n}.weight" for n in names}
    older = {n: (t.t().contiguous() if n in converted else t) for n, t in model.state_dict().items()}
    for state in (model.state_dict(), older):
        fresh = convert()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the older layout warns
            fresh.load_state_dict(state)
        assert all(torch.equal(fresh.get_submodule(n).weight, model.get_submodule(n).weight) for n in names)


def test_a_dynamic_rope_model_saves_after_a_long_batch(tmp_path):
    # a dynamic RoPE recomputes its non-persistent inv_freq for a batch longer than
    # max_position_embeddings: convert watched that buffer, so every save after such a batch
    # refused ("changed since convert"), and model.save_pretrained (the Trainer's) wrote no diff
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, max_position_embeddings=16,
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    base = transformers.LlamaForCausalLM(cfg).eval()
    model = hf.convert(copy.deepcopy(base), density=0.1)
    with torch.no_grad():
        for _, layer in hf.model._converted(model):
            layer.delta_values.normal_(0, 0.1)  # as if trained
        ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        want = model(input_ids=ids).logits
    assert not torch.equal(model.model.rotary_emb.inv_freq, base.model.rotary_emb.inv_freq)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "holds transformers' files only, no xlsparse diff"
        model.save_pretrained(str(tmp_path))
    loaded = hf.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
    with torch.no_grad():  # a persistent weight outside the diff is still watched
        model.model.norm.weight.add_(0.01)
    with pytest.raises(ValueError, match="model.norm.weight"):
        hf.save_pretrained(model, str(tmp_path / "again"))


@pytest.mark.parametrize("way", ["merge", "unmerge"])
def test_hf_merge_and_unmerge_failing_part_way_leave_the_model_as_it_was(way, monkeypatch):
    """A layer's merge (or unmerge) failing after the checks (out of memory, an interrupt) undoes
    the layers done before it: the model was left half merged. A layer merged before hf.merge stays
    merged."""
    from xlsparse.nn import SparseDeltaLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))
    hf.convert(model, density=0.5)
    with torch.no_grad():
        for layer in model:
            layer.delta_values.normal_()
    base = [layer.weight.detach().clone() for layer in model]
    if way == "merge":
        model[1].merge()  # merged already: hf.merge leaves it so
    else:
        hf.merge(model)
    before = [(layer.merged, layer.weight.detach().clone()) for layer in model]
    real = getattr(SparseDeltaLinear, way)

    def fails_on_the_last(self):
        if self is model[2]:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(SparseDeltaLinear, way, fails_on_the_last)
    with pytest.raises(KeyboardInterrupt):
        getattr(hf, way)(model)
    for layer, (merged, weight) in zip(model, before):
        assert layer.merged == merged and torch.equal(layer.weight, weight)
    monkeypatch.undo()
    hf.unmerge(model)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(model, base))
