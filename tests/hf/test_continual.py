"""LAFT-URIEL continual updates: URIEL distances over five feature sets, language-aware subsets,
the mixed-batch update against one masked optimizer step per language on the same batch
(restated in plain torch), and the per-language report."""
import copy
import re

import pytest
import torch
from tiny_models import SHARDING, VOCAB, ask_for_sharding, tiny

from xlsparse import hf
from xlsparse.hf import continual


@pytest.mark.slow  # loads lang2vec's URIEL tables: ~20 s
def test_uriel_distances_and_language_aware_masks():
    pytest.importorskip("lang2vec")
    assert continual.uriel_distance("eng", "deu") < continual.uriel_distance("eng", "jpn")
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:2]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    scores = {lang: {n: torch.rand(named[n].shape, generator=g) for n in names} for lang in ("en", "de", "ja")}
    masks = continual.language_aware_masks(scores, {"en": "eng", "de": "deu", "ja": "jpn"}, density=0.1)
    k = round(0.1 * sum(named[n].numel() for n in names))
    assert all(sum(int(m.sum()) for m in masks[lang].values()) == k for lang in masks)
    with pytest.raises(ValueError, match="unknown"):
        continual.uriel_distance("eng", "zzz")
    # a parameter scored for one language only was skipped (or a bare KeyError, in the other order)
    extra = dict(scores, ja={**scores["ja"], "bert.pooler.dense.weight": torch.rand(32, 32, generator=g)})
    with pytest.raises(ValueError, match="score the same parameters"):
        continual.language_aware_masks(extra, {"en": "eng", "de": "deu", "ja": "jpn"}, density=0.1)
    # a set with gaps ('--') failed inside float()
    with pytest.raises(ValueError, match="'syntax_average' has missing values"):
        continual.uriel_distance("eng", "deu", features=("syntax_average",))


@pytest.mark.parametrize("call", [lambda f: continual.distance_matrix(["eng", "deu"], f),
                                  lambda f: continual.uriel_vectors(["eng"], f),
                                  lambda f: continual.uriel_distance("eng", "deu", f)])
def test_features_given_as_one_string_are_refused_naming_the_argument(call):
    # a bare string was read one character at a time: feature sets "s", "y", "n", ...
    with pytest.raises(TypeError, match=r"features must be a tuple of URIEL feature-set names.*'syntax_knn'"):
        call("syntax_knn")


def test_languages_given_as_one_string_or_none_are_refused_naming_the_argument():
    # a bare string was read one character at a time (codes 'd', 'e', 'u'); no language failed in torch.stack
    for call in (continual.distance_matrix, continual.uriel_vectors):
        with pytest.raises(TypeError, match=rf"^{call.__name__}: langs must be a list of ISO 639-3 codes.*\['deu'\]"):
            call("deu")
    with pytest.raises(ValueError, match="^distance_matrix: langs must name at least one language"):
        continual.distance_matrix([])


def test_uriel_distance_of_one_set_is_one_minus_the_cosine_of_lang2vec_vectors():
    """DESIGN.md's URIEL distance: the cosine distance of lang2vec's syntax_knn vectors, read here
    straight from lang2vec (eng-deu 0.10, eng-jpn 0.50, as measured there)."""
    pytest.importorskip("lang2vec")
    table = continual._lang2vec().get_features(["eng", "deu", "jpn"], "syntax_knn")
    vec = {lang: torch.tensor([float(x) for x in table[lang]], dtype=torch.float64) for lang in table}
    for other, measured in (("deu", 0.10), ("jpn", 0.50)):
        a, b = vec["eng"], vec[other]
        expect = 1 - float(a @ b) / float(a.norm() * b.norm())
        assert continual.uriel_distance("eng", other, features=("syntax_knn",)) == pytest.approx(expect, abs=1e-12)
        assert expect == pytest.approx(measured, abs=0.005)


def test_uriel_distance_averages_the_cosines_of_the_sets_both_languages_have(monkeypatch):
    """Synthetic blocks in lang2vec's cache: 'ccc' has an all-zero second set, 'zzz' only zeros."""
    g = torch.Generator().manual_seed(0)
    features = ("f1", "f2", "f3")
    blocks = {}
    for lang in ("aaa", "bbb", "ccc", "zzz"):
        for f, width in zip(features, (4, 7, 3)):
            v = torch.randn(width, generator=g, dtype=torch.float64)
            zero = lang == "zzz" or (lang, f) == ("ccc", "f2")
            blocks[f, lang] = torch.zeros_like(v) if zero else v / v.norm()
            monkeypatch.setitem(continual._URIEL_CACHE, (f, lang), blocks[f, lang])

    def cos(a, b, f):
        return float(blocks[f, a] @ blocks[f, b])

    d = continual.distance_matrix(["aaa", "bbb", "ccc"], features)
    assert d[0, 1] == pytest.approx(1 - sum(cos("aaa", "bbb", f) for f in features) / 3)
    assert d[0, 2] == pytest.approx(1 - (cos("aaa", "ccc", "f1") + cos("aaa", "ccc", "f3")) / 2)
    assert d[1, 2] == pytest.approx(1 - (cos("bbb", "ccc", "f1") + cos("bbb", "ccc", "f3")) / 2)
    assert torch.equal(d, d.T) and float(d.diagonal().abs().sum()) == 0
    with pytest.raises(ValueError, match="'aaa' and 'zzz' share no feature set"):
        continual.distance_matrix(["aaa", "zzz"], features)


def test_language_aware_masks_rank_the_signed_distance_weighted_score(monkeypatch):
    """score_l = s_l/Σs_l − protect · Σ_{m≠l} d(l, m) · (s_m/Σs_m) / (L − 1), top k by value,
    restated with hand-made URIEL blocks so that the distances are known."""
    g = torch.Generator().manual_seed(1)
    features = ("f1", "f2")
    for lang in ("aaa", "bbb", "ccc", "ddd"):
        for f in features:
            v = torch.randn(5, generator=g, dtype=torch.float64)
            monkeypatch.setitem(continual._URIEL_CACHE, (f, lang), v / v.norm())
    codes = {"a": "aaa", "b": "bbb", "c": "ccc"}
    scores = {lang: {"w": torch.randint(1, 50, (6, 7), generator=g).float(), "v": torch.randint(1, 50, (5,), generator=g).float()}
              for lang in codes}
    d = continual.distance_matrix(list(codes.values()), features)
    masks = continual.language_aware_masks(scores, codes, density=0.2, protect=1.5, features=features)
    langs = list(codes)
    flat = {lang: torch.cat([scores[lang]["w"].flatten(), scores[lang]["v"]]).double() for lang in langs}
    k = round(0.2 * 47)
    for i, lang in enumerate(langs):
        own = flat[lang] / flat[lang].sum()
        discount = sum(float(d[i, j]) * flat[m] / flat[m].sum() for j, m in enumerate(langs) if j != i) / 2
        expect = torch.zeros(47, dtype=torch.bool)
        expect[(own - 1.5 * discount).argsort(descending=True)[:k]] = True
        got = torch.cat([masks[lang]["w"].flatten(), masks[lang]["v"]])
        assert torch.equal(got, expect), lang
    # An entry only a distant language needs is left to it, however large its score there.
    one = {lang: {"w": torch.ones(10)} for lang in ("a", "d")}
    one["d"]["w"][:3] = 100.0
    far = continual.language_aware_masks(one, {"a": "aaa", "d": "ddd"}, density=0.3, features=features)
    assert not bool(far["a"]["w"][:3].any()) and bool(far["d"]["w"][:3].all())
    # With two languages the distance still matters: a partner at distance 0 takes nothing away,
    # one at distance 1 discounts fully and flips the choice.
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    for f in features:
        for lang, v in (("ppp", e1), ("qqq", e1), ("rrr", e2)):
            monkeypatch.setitem(continual._URIEL_CACHE, (f, lang), v)
    pair = {"a": {"w": torch.tensor([10.0, 9.0, 1.0])}, "b": {"w": torch.tensor([1.0, 0.0, 9.0])}}
    same = continual.language_aware_masks(pair, {"a": "ppp", "b": "qqq"}, density=0.34, features=features)
    apart = continual.language_aware_masks(pair, {"a": "ppp", "b": "rrr"}, density=0.34, features=features)
    assert same["a"]["w"].tolist() == [True, False, False]  # 0.5 vs 0.45: its own ranking
    assert apart["a"]["w"].tolist() == [False, True, False]  # 0.5 - 0.1 < 0.45
    # Scores far closer together than the lowest (negative) score is large still rank by value:
    # a float32 shift by the lowest rounded them together, and the tie went by position.
    n = 1000
    close = 1.0 + torch.randperm(n, generator=g).float() * 1e-7
    spike = torch.ones(n)
    spike[0] = 1e6
    tight = continual.language_aware_masks({"a": {"w": close}, "b": {"w": spike}}, {"a": "ppp", "b": "rrr"},
                                           density=0.1, features=features)
    signed = close.double() / close.double().sum() - spike.double() / spike.double().sum()  # d = 1
    expect = torch.zeros(n, dtype=torch.bool)
    expect[signed.topk(100).indices] = True
    assert torch.equal(tight["a"]["w"], expect)
    # Signed scores would flip the ranking once divided by a negative sum: they raise.
    with pytest.raises(ValueError, match=r"scores\['a'\] must be finite and >= 0"):
        continual.language_aware_masks({"a": {"w": -close}, "b": {"w": spike}}, {"a": "ppp", "b": "rrr"},
                                       density=0.1, features=features)
    with pytest.raises(ValueError, match=r"scores\['b'\] and scores\['a'\] have different shapes for \['w'\]"):
        continual.language_aware_masks({"a": {"w": torch.ones(4, 4)}, "b": {"w": torch.ones(1, 4)}},
                                       {"a": "ppp", "b": "rrr"}, density=0.1, features=features)
    with pytest.raises(ValueError, match="scores holds no language"):  # was a bare StopIteration
        continual.language_aware_masks({}, {}, density=0.1, features=features)
    with pytest.raises(ValueError, match=r"uriel_codes has no ISO 639-3 code for \['b'\]"):
        continual.language_aware_masks({"a": {"w": close}, "b": {"w": spike}}, {"a": "ppp"}, density=0.1,
                                       features=features)
    # A negative protect would put the entries other languages need first; True was read as 1.0.
    for protect in (-0.5, float("nan"), "1", True):
        with pytest.raises(ValueError, match="protect must be a finite number >= 0"):
            continual.language_aware_masks({"a": {"w": close}, "b": {"w": spike}}, {"a": "ppp", "b": "rrr"},
                                           density=0.1, protect=protect, features=features)


def test_language_aware_masks_break_ties_by_parameter_name_not_dict_order(monkeypatch):
    # Entries no language needs all score 0; where the budget reaches them, the tie goes to the
    # lowest position with the parameters in name order, whichever dict order the scores have.
    for f in ("f1",):
        for lang, v in (("ppp", [1.0, 0.0]), ("rrr", [0.0, 1.0])):
            monkeypatch.setitem(continual._URIEL_CACHE, (f, lang), torch.tensor(v, dtype=torch.float64))
    a = {"y.weight": torch.tensor([0.0, 3.0, 0.0]), "x.weight": torch.tensor([0.0, 0.0, 0.0])}
    b = {"y.weight": torch.tensor([0.0, 0.0, 0.0]), "x.weight": torch.tensor([0.0, 0.0, 1.0])}
    # a's signed scores: y[1] = 1 on top, then four zeros (x[2] is -1: b's); k = 2 takes the first
    # zero in x, y order
    expect = {"x.weight": [True, False, False], "y.weight": [False, True, False]}
    for first in ("a", "b"):
        scores = {"a": a, "b": b} if first == "a" else {"b": dict(reversed(b.items())), "a": a}
        masks = continual.language_aware_masks(scores, {"a": "ppp", "b": "rrr"}, density=2 / 6, features=("f1",))
        assert list(masks["a"]) == list(scores[first])  # the scores' own order is kept
        assert {n: m.tolist() for n, m in masks["a"].items()} == expect, first


def test_language_aware_masks_refuse_a_language_none_of_whose_examples_was_scored(monkeypatch):
    """All-zero scores (no batch, or none with a labelled token) gave the language a subset anyway:
    the entries the other languages need least, ties by position; select_masks refuses them too."""
    for lang, v in (("ppp", [1.0, 0.0]), ("rrr", [0.0, 1.0])):
        monkeypatch.setitem(continual._URIEL_CACHE, ("f1", lang), torch.tensor(v, dtype=torch.float64))
    scores = {"a": {"w": torch.tensor([3.0, 1.0, 2.0, 0.5])}, "b": {"w": torch.zeros(4)}}
    with pytest.raises(ValueError, match=r"language_aware_masks: scores\['b'\] are all zero"):
        continual.language_aware_masks(scores, {"a": "ppp", "b": "rrr"}, density=0.5, features=("f1",))
    # nothing asked of it (density 0): nothing to refuse
    masks = continual.language_aware_masks(scores, {"a": "ppp", "b": "rrr"}, density=0.0, features=("f1",))
    assert not bool(masks["b"]["w"].any())


def _mixed_batch(seed, b=6, s=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, s), generator=g)
    return {"input_ids": ids, "labels": ids, "language_ids": torch.tensor([0, 1, 2, 0, 1, 2])[:b]}


def _bert_with_open_masks(*langs):
    """A tiny BERT and, per language, masks opening every entry of its first two target weights."""
    model = tiny("bert")
    named = dict(model.named_parameters())
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:2]
    return model, {lang: {n: torch.ones_like(named[n], dtype=torch.bool) for n in names} for lang in langs}


def _per_language_steps(model, batch, masks, lr, betas=(0.9, 0.999), eps=1e-8):
    """One AdamW step per language on the same batch, restated in plain torch: language l's
    gradient is that of the batch-mean loss through l's examples only, applied to l's mask."""
    named = dict(model.named_parameters())
    ids, lang_of = batch["input_ids"], batch["language_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                                   reduction="none").reshape(ids.shape[0], -1)
    names = sorted({n for m in masks.values() for n in m})
    new = {n: named[n].detach().clone() for n in names}
    for lang_index, lang in enumerate(masks):
        loss = token_loss[lang_of == lang_index].sum() / token_loss.numel()  # this language's share of the mean
        grads = torch.autograd.grad(loss, [named[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads):
            m = masks[lang][n]
            m_hat, v_hat = g * (1 - betas[0]) / (1 - betas[0]), g * g * (1 - betas[1]) / (1 - betas[1])
            step = lr * m_hat / (v_hat.sqrt() + eps)
            new[n] = torch.where(m, new[n] - step, new[n])
    return new


def _rotated(masks):
    """Each language gets the next one's subsets: an earlier round's conversion that the update must replace."""
    langs = list(masks)
    return {lang: masks[langs[(i + 1) % len(langs)]] for i, lang in enumerate(langs)}


@pytest.mark.parametrize("converted_before", [False, True])
def test_mixed_batch_update_equals_one_masked_step_per_language(converted_before):
    model = tiny("llama")
    twin = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    # disjoint subsets: each entry belongs to at most one of three languages
    owner = {n: torch.randint(0, 6, named[n].shape, generator=g) for n in names}
    masks = {lang: {n: owner[n] == i for n in names} for i, lang in enumerate(("de", "fr", "ja"))}
    if converted_before:
        hf.convert(model, kind="subnetwork", masks=_rotated(masks))
    before = {n: p.detach().clone() for n, p in named.items()}
    batch = _mixed_batch(0)
    losses = continual.continual_update(model, [batch], masks, lr=1e-2, progress=False)
    assert len(losses) == 1
    expect = _per_language_steps(twin, batch, masks, lr=1e-2)
    named = dict(model.named_parameters())
    for n, p in named.items():
        if n in expect:
            torch.testing.assert_close(p, expect[n], rtol=1e-5, atol=1e-6)
            closed = ~(masks["de"][n] | masks["fr"][n] | masks["ja"][n])
            assert torch.equal(p[closed], before[n][closed]) and not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n


class _Examples(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


@pytest.mark.parametrize("converted_before", [False, True, "with modules_to_save"])
def test_continual_trainer_makes_the_same_update(tmp_path, converted_before):
    """Both ways train the same entries the same way, a model converted with modules_to_save
    included (both then train the saved module whole)."""
    from transformers import TrainingArguments

    model = tiny("llama")
    twin = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.2 for n in names} for lang in ("de", "fr", "ja")}
    if converted_before:
        saved = ["model.norm"] if converted_before == "with modules_to_save" else None
        for m in (model, twin) if saved else (model,):  # the saved module must exist in both
            hf.convert(m, kind="subnetwork", masks=_rotated(masks), modules_to_save=saved)
    norm = model.model.norm.weight.detach().clone()
    batch = _mixed_batch(3)
    # Weight decay too, on the masked weights but not on a saved module's norm (the Trainer's rule).
    wd = 0.5 if converted_before == "with modules_to_save" else 0.0
    continual.continual_update(twin, [batch], masks, lr=1e-2, weight_decay=wd, progress=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=6, learning_rate=1e-2, max_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=wd)
    continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(batch)).train()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(model.model.norm.weight, norm) == (converted_before != "with modules_to_save")


def _continual_run(tmp_path, out, seed=0, earlier_update=False, resume=None, density=0.2):
    """continual_trainer on tiny("llama", seed) for 4 steps (checkpoints every 2), optionally on a
    model an earlier update converted and trained (its record holds the values from that convert)."""
    from transformers import TrainingArguments

    model = tiny("llama", seed=seed)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(2)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < density for n in names} for lang in ("de", "fr", "ja")}
    if earlier_update:
        continual.continual_update(model, [_mixed_batch(4)], _rotated(masks), lr=1e-2, progress=False)
    args = TrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=3, learning_rate=1e-2,
                             max_steps=4, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1000, lr_scheduler_type="constant", max_grad_norm=0.0)
    trainer = continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(3)))
    return model, trainer


@pytest.mark.parametrize("earlier_update", [False, True])
def test_continual_trainer_resumed_on_the_same_base_matches_the_uninterrupted_run(tmp_path, earlier_update):
    model, trainer = _continual_run(tmp_path, "a", earlier_update=earlier_update)
    trainer.train()
    resumed, trainer = _continual_run(tmp_path, "b", earlier_update=earlier_update)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    want, got = hf.extract_diff(model), hf.extract_diff(resumed)
    for n, d in want.deltas.items():
        assert torch.equal(d.indices, got.deltas[n].indices) and torch.equal(d.values, got.deltas[n].values), n


def test_continual_trainer_refuses_to_resume_with_other_masks_before_anything_changes(tmp_path):
    # the resume restored the checkpoint's masks over the ones given (density 0.5 asked, 0.2 trained)
    # and the update went on with the other subsets, silently
    from xlsparse.nn import SubnetworkLinear

    _continual_run(tmp_path, "a")[1].train()
    model, trainer = _continual_run(tmp_path, "b", density=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: layer.masks.clone() for n, layer in hf.model._converted(model, SubnetworkLinear)}
    with pytest.raises(ValueError, match="holds other masks than this run was given"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for n, layer in hf.model._converted(model, SubnetworkLinear):
        assert torch.equal(layer.masks, masks[n]), n


def test_continual_trainer_refuses_to_resume_on_another_base_model(tmp_path):
    # the model took the checkpoint's weights and values from convert, and trained on: the update of
    # another fine-tuned model (here another seed), whose diff then refused only at extract_diff
    _continual_run(tmp_path, "a")[1].train()
    model, trainer = _continual_run(tmp_path, "b", seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="checkpoint-2 was trained from another base model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_continual_update_rejects_batches_without_language_ids():
    model, masks = _bert_with_open_masks("de")
    batch = _mixed_batch(1)
    del batch["language_ids"]
    with pytest.raises(ValueError, match="language_ids"):
        continual.continual_update(model, [batch], masks, progress=False)
    batch = _mixed_batch(1)
    batch["language_ids"] = ["es"] * len(batch["language_ids"])
    with pytest.raises(ValueError, match=r"unknown languages \['es', .*the masks have \['de'\]"):
        continual.continual_update(model, [batch], masks, progress=False)


@pytest.mark.parametrize("ids", [torch.tensor([0.6, 1.4, 0.2, 1.9]), [True, False, True, False]])
def test_continual_update_refuses_float_and_bool_language_ids(ids):
    # a float id was cast with .long(): 1.9 trained language 1's subset, 0.6 language 0's; True was 1
    model, masks = _bert_with_open_masks("de", "fr")
    batch = dict(_mixed_batch(1, b=4), language_ids=ids)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="ids must be integers"):
        continual.continual_update(model, [batch], masks, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_continual_update_on_a_converted_model_refuses_masks_of_layers_it_does_not_route():
    model, masks = _bert_with_open_masks("de")
    names = list(masks["de"])
    hf.convert(model, [names[0][: -len(".weight")]], kind="subnetwork", masks={"de": {names[0]: masks["de"][names[0]]}})
    batches = [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 0]))]
    with pytest.raises(ValueError, match=f"does not route: \\['{names[1]}'\\]"):
        continual.continual_update(model, batches, masks, progress=False)


def test_continual_update_refuses_masks_of_a_bias_naming_it_before_converting_the_model():
    model = tiny("bert")
    name = "bert.encoder.layer.0.attention.self.query.bias"
    masks = {"en": {name: torch.ones(32, dtype=torch.bool)}}
    ids = torch.randint(3, VOCAB, (1, 5))
    with pytest.raises(ValueError, match=re.escape(repr([name]))):
        continual.continual_update(model, [{"input_ids": ids, "labels": ids, "language_ids": torch.tensor([0])}],
                                   masks, progress=False)
    assert not any(type(m).__name__ == "SubnetworkLinear" for m in model.modules())


def test_continual_update_refuses_a_one_shot_iterator_for_several_epochs():
    model, masks = _bert_with_open_masks("de")
    batches = [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 0]))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="epochs=2 needs batches that can be iterated again"):
        continual.continual_update(model, (b for b in batches), masks, epochs=2, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # one batch, not a list of them: its keys were read as batches ("every batch must carry language_ids")
    with pytest.raises(TypeError, match=r"continual_update: batches .* one batch .*\[batch\]"):
        continual.continual_update(model, batches[0], masks, progress=False)
    assert _unchanged(model, before)
    assert len(continual.continual_update(model, batches, masks, epochs=2, progress=False)) == 2


def _unchanged(model, before):
    from xlsparse.nn import SubnetworkLinear

    return not any(isinstance(m, SubnetworkLinear) for m in model.modules()) and \
        all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("bad, error, match", [
    ({"lr": -1.0}, ValueError, "lr must be >= 0"), ({"lr": float("nan")}, ValueError, "lr must be finite"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay must be >= 0"),
    ({"epochs": 1.5}, TypeError, "epochs must be an int"), ({"epochs": 0}, ValueError, "epochs must be >= 1"),
    ({"progress": "no"}, TypeError, "progress must be a bool")])
def test_continual_update_refuses_bad_arguments_before_converting_the_model(bad, error, match):
    # these raised only after the model's layers had been swapped and its other parameters frozen
    # (epochs=0 converted the model and returned no steps)
    model, masks = _bert_with_open_masks("de")
    batches = [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 0]))]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=f"continual_update: {match}"):
        continual.continual_update(model, batches, masks, **{"progress": False, **bad})
    assert _unchanged(model, before)


def test_continual_update_and_trainer_refuse_masks_that_are_not_bool_before_converting_the_model():
    # two languages' float masks met in a bare NotImplementedError ("bitwise_or_cpu" not implemented for 'Float')
    model, masks = _bert_with_open_masks("de", "fr")
    masks["fr"] = {n: m.float() for n, m in masks["fr"].items()}
    first = next(iter(masks["fr"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=rf"continual_update: masks\['fr'\]\['{first}'\] must be a bool .*float32"):
        continual.continual_update(model, batches, masks, progress=False)
    with pytest.raises(ValueError, match=rf"continual_trainer: masks\['fr'\]\['{first}'\] must be a bool tensor"):
        continual.continual_trainer(model, masks)
    assert _unchanged(model, before)


def test_continual_update_and_trainer_refuse_masks_that_open_no_entry_before_converting_the_model(tmp_path):
    # continual_update failed after converting ("optimizer got an empty parameter list"); continual_trainer
    # ran its steps and changed nothing
    from transformers import TrainingArguments

    model, masks = _bert_with_open_masks("de", "fr")
    masks = {lang: {n: torch.zeros_like(m) for n, m in lang_masks.items()} for lang, lang_masks in masks.items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="continual_update: the masks of every language .* open no entry"):
        continual.continual_update(model, batches, masks, progress=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True)
    with pytest.raises(ValueError, match="continual_trainer: the masks of every language .* open no entry"):
        continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(batches[0]))
    assert _unchanged(model, before)
    # one language opening one entry is enough
    first = next(iter(masks["fr"]))
    masks["fr"][first].view(-1)[0] = True
    assert len(continual.continual_update(model, batches, masks, progress=False)) == 1
    # and so is a model converted with modules_to_save, which train whole: the update trains the head alone
    model, _ = _bert_with_open_masks("de", "fr")
    hf.convert(model, sorted(n[: -len(".weight")] for n in masks["de"]), kind="subnetwork", masks=masks,
               modules_to_save=["cls.predictions.transform"])
    masks["fr"][first].view(-1)[0] = False
    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("cls.predictions.transform.")}
    assert len(continual.continual_update(model, batches, masks, lr=1e-2, progress=False)) == 1
    named = dict(model.named_parameters())
    assert any(not torch.equal(named[n], v) for n, v in head.items())


def test_continual_update_refuses_empty_batches():
    # [] converted the model, trained nothing and returned [] (as epochs=0 did before it was refused)
    model, masks = _bert_with_open_masks("de", "fr")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="continual_update: batches is empty"):
        continual.continual_update(model, [], masks, progress=False)
    assert _unchanged(model, before)
    # an iterator that yields nothing is known only after the conversion: the error says so
    with pytest.raises(ValueError, match="continual_update: batches yielded no batch") as raised:
        continual.continual_update(model, iter([]), masks, progress=False)
    assert "converted (or given these masks) in place and 0 update step" in "".join(raised.value.__notes__)


def test_continual_update_checks_the_language_ids_of_listed_batches_before_converting_the_model():
    # id 5 of two languages raised in route, after the model was converted and its other parameters frozen
    model, masks = _bert_with_open_masks("de", "fr")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))
    bad = dict(_mixed_batch(2, b=2), language_ids=torch.tensor([1, 5]))
    with pytest.raises(IndexError, match=r"ids must lie in \[-1, 2\), got min 1, max 5"):
        continual.continual_update(model, [good, bad], masks, progress=False)
    assert _unchanged(model, before)
    # batches seen only one at a time: the error says that the model was changed before it
    with pytest.raises(IndexError, match="ids must lie") as raised:
        continual.continual_update(model, iter([good, bad]), masks, progress=False)
    assert "converted (or given these masks) in place and 1 update step" in "".join(raised.value.__notes__)


def test_continual_update_checks_the_ids_of_a_step_once_as_a_routed_step_does(monkeypatch):
    # the loop range-checked each batch's ids (a host sync) and route checked them again: one sync more per step
    from xlsparse import routing

    calls = []
    check = routing.check_ids
    monkeypatch.setattr(routing, "check_ids", lambda ids, num: (calls.append(num), check(ids, num))[1])
    model, masks = _bert_with_open_masks("de", "fr")
    batch = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))
    continual.continual_update(model, iter([batch]), masks, progress=False)  # an iterator: no up-front pass
    per_step = len(calls)
    calls.clear()
    with hf.route(model, batch["language_ids"]):  # what a routed training step checks anyway
        model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    assert per_step == len(calls) > 0
    calls.clear()
    continual.continual_update(model, [batch, batch], masks, progress=False)  # listed: one check each up front
    assert len(calls) == 2 + 2 * per_step


def test_continual_update_freezes_nothing_when_its_optimizer_cannot_be_built(monkeypatch):
    # MaskedAdamW was built after the parameters outside the masks were frozen: a failure left them frozen
    model, masks = _bert_with_open_masks("de")
    hf.convert(model, [n[: -len(".weight")] for n in masks["de"]], kind="subnetwork", masks=masks)
    first = next(iter(masks["de"]))
    narrow = {"de": {first: masks["de"][first]}}  # the second converted weight is outside the update
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert sum(flags.values()) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("no optimizer")

    monkeypatch.setattr(continual, "MaskedAdamW", broken)
    with pytest.raises(RuntimeError, match="no optimizer"):
        continual.continual_update(model, [dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 0]))], narrow,
                                   progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_continual_trainer_refuses_bad_optimizer_arguments_before_converting_the_model(tmp_path):
    # MaskedAdamW refused them only at train(), on a model continual_trainer had already converted
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear

    model, masks = _bert_with_open_masks("de")
    for bad, match in (({"learning_rate": -1.0}, "lr must be >= 0"), ({"adam_beta1": 1.5}, "beta1 must be in"),
                       ({"weight_decay": float("nan")}, "weight_decay must be finite")):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, **bad)
        with pytest.raises(ValueError, match=f"continual_trainer: {match}"):
            continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(1)))
        assert not any(isinstance(m, SubnetworkLinear) for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())



def test_continual_trainer_refuses_an_optimizer_opening_entries_outside_the_masks_before_converting(tmp_path):
    # SubnetworkTrainer refused it only after continual_trainer had converted the model
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear
    from xlsparse.optim import MaskedAdamW

    model, masks = _bert_with_open_masks("de")
    first = next(iter(masks["de"]))
    masks["de"][first][0] = False  # one row closed: a whole-weight optimizer steps it
    named = dict(model.named_parameters())
    opened = MaskedAdamW([named[first]], [None], lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=f"continual_trainer: the optimizer steps {named[first].shape[1]} entries of "
                                         f"{re.escape(first)} that no language"):
        continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(1)),
                                    optimizers=(opened, None))
    assert not any(isinstance(m, SubnetworkLinear) for m in model.modules())
    confined = MaskedAdamW([named[first]], [masks["de"][first]], lr=1e-2)
    continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(1)),
                                optimizers=(confined, None))


def test_continual_trainer_checks_a_converted_gpt2_s_optimizer_in_the_stored_layout(tmp_path):
    # a converted Conv1D weight is stored [out, in] while masks come in the model's [in, out]: the
    # check before the update compared them as given
    from transformers import TrainingArguments

    from xlsparse.optim import MaskedAdamW

    model = tiny("gpt2")
    named = dict(model.named_parameters())
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:2]
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.5 for n in names} for lang in ("de", "fr")}
    hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
    layers = dict(hf.model._converted(model))
    weights = [layers[n[: -len(".weight")]].weight for n in names]
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    whole = MaskedAdamW(weights, [None] * len(weights), lr=1e-2)
    with pytest.raises(ValueError, match="continual_trainer: the optimizer steps .* entries of"):
        continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(1)),
                                    optimizers=(whole, None))
    unions = [(masks["de"][n] | masks["fr"][n]).t() for n in names]  # stored [out, in]
    continual.continual_trainer(model, masks, args=args, train_dataset=_Examples(_mixed_batch(1)),
                                optimizers=(MaskedAdamW(weights, unions, lr=1e-2), None))


@pytest.mark.parametrize("how", SHARDING)
def test_continual_trainer_refuses_fsdp_and_deepspeed_before_converting_the_model(tmp_path, monkeypatch, how):
    # the README's Distributed section says so; only the other three trainers were tested
    from transformers import TrainingArguments

    model, masks = _bert_with_open_masks("de")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=f"(?s){how}.*continual_trainer does not run under"):
        continual.continual_trainer(model, masks, args=ask_for_sharding(monkeypatch, args, how),
                                    train_dataset=_Examples(_mixed_batch(1)))
    assert _unchanged(model, before)

def test_per_language_report():
    report = continual.per_language_report({"de": 0.5, "fr": 0.6, "ja": 0.4}, {"de": 0.55, "fr": 0.5, "ja": 0.3})
    assert (report.improved, report.worsened) == (1, 2)
    assert report.mean_loss == pytest.approx(0.1)
    assert "| fr | 0.6000 | 0.5000 | -0.1000 |" in report.table()
    assert report.share_improved == pytest.approx(1 / 3) and "improved 1 of 3 (share 0.333)" in report.table()
    with pytest.raises(ValueError):
        continual.per_language_report({"de": 1.0}, {"fr": 1.0})
    with pytest.raises(ValueError, match="hold no language"):  # it reported a share of 0.000 of no language
        continual.per_language_report({}, {})
    with pytest.raises(ValueError, match=r"after\['fr'\] must be finite"):  # NaN: neither better nor worse
        continual.per_language_report({"de": 0.5, "fr": 0.6}, {"de": 0.55, "fr": float("nan")})
    # True was read as 1.0 (fr worse by 0.4); a string failed only in `change`, with a bare TypeError
    with pytest.raises(TypeError, match=r"per_language_report: before\['fr'\] must be a number, got bool"):
        continual.per_language_report({"de": 0.5, "fr": True}, {"de": 0.55, "fr": 0.6})
    with pytest.raises(TypeError, match=r"per_language_report: after\['de'\] must be a number, got str"):
        continual.per_language_report({"de": 0.5, "fr": 0.6}, {"de": "0.55", "fr": 0.5})
    with pytest.raises(TypeError, match="higher_is_better must be a bool"):  # "no" is truthy: fr counted as improved
        continual.per_language_report({"de": 0.5, "fr": 0.6}, {"de": 0.55, "fr": 0.5}, higher_is_better="no")


def test_an_interrupted_continual_update_says_the_model_was_changed():
    """Ctrl-C in the middle of continual_update gets the same note as an error: the model was
    converted in place and some steps were taken (only Exceptions had it)."""
    model, masks = _bert_with_open_masks("de", "fr")
    good = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))

    def batches():
        yield good
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as raised:
        continual.continual_update(model, batches(), masks, progress=False)
    assert "converted (or given these masks) in place and 1 update step" in "".join(raised.value.__notes__)


def test_continual_update_refuses_a_step_whose_loss_is_not_finite():
    # A batch with no labelled token has loss NaN: its step moved the subsets by AdamW's momentum
    # (and would write NaN after a diverged one). It raises, and the model is as after the steps before.
    model, masks = _bert_with_open_masks("de", "fr")
    twin = copy.deepcopy(model)
    good = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))
    unlabelled = dict(good, labels=torch.full_like(good["labels"], -100))
    torch.manual_seed(0)  # the same dropout in both runs
    continual.continual_update(twin, [good], masks, lr=1e-2, progress=False)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"loss of step 2 is nan .*that step was not taken") as raised:
        continual.continual_update(model, [good, unlabelled], masks, lr=1e-2, progress=False)
    assert "1 update step" in "".join(raised.value.__notes__)
    expect = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, expect[n]), n


def _finite_loss_bad_gradient(kind):
    """A loss_fn whose value is the model's loss but whose gradient at one weight entry is inf or
    NaN, as a half-precision backward that overflowed leaves it."""
    def loss_fn(model, batch):
        w = next(p for p in model.parameters() if p.requires_grad).reshape(-1)[0]
        zero = w - w.detach()  # 0, with gradient 1
        if kind == "inf":
            extra = zero.abs().sqrt()  # sqrt at 0: value 0, gradient inf
        else:  # the branch torch.where does not take is NaN: its gradient, 0 · NaN, is NaN
            extra = torch.where(torch.tensor(True), zero * 0, (zero - 1).sqrt())
        return model(**batch).loss + extra.to(torch.float32)
    return loss_fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_continual_update_refuses_a_finite_loss_with_a_non_finite_gradient_before_writing(monkeypatch, kind, dtype):
    # The loss was checked, the gradient not: a finite loss with an inf/NaN gradient (a fp16
    # backward that overflowed) let MaskedAdamW write NaN into the weights and its state. Now the
    # step is refused, and the weights and the optimizer state are bit for bit as after step 1.
    model, masks = _bert_with_open_masks("de", "fr")
    model.to(dtype)
    good = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))
    made, after_first = [], {}

    def snapshot(opt, *_):  # after step 1, the last one taken
        after_first.setdefault("weights", {n: p.detach().clone() for n, p in model.named_parameters()})
        after_first.setdefault("state", copy.deepcopy(opt.state_dict()))

    class Recording(continual.MaskedAdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_step_post_hook(snapshot)
            made.append(self)

    monkeypatch.setattr(continual, "MaskedAdamW", Recording)
    calls = []

    def loss_fn(m, b):  # step 1 plain, step 2 with a finite loss and an inf/NaN gradient
        calls.append(b)
        return m(**b).loss if len(calls) == 1 else _finite_loss_bad_gradient(kind)(m, b)

    with pytest.raises(ValueError, match=r"loss of step 2 is [-0-9.e]+ but a gradient entry it would read is inf/NaN "
                                         r".*that step was not taken") as raised:
        continual.continual_update(model, [good, good], masks, lr=1e-2, loss_fn=loss_fn, progress=False)
    assert "1 update step" in "".join(raised.value.__notes__)
    (opt,) = made
    for n, p in model.named_parameters():
        assert torch.equal(p, after_first["weights"][n]), n
    state, expect = opt.state_dict(), after_first["state"]
    assert state["param_groups"] == expect["param_groups"] and state["state"].keys() == expect["state"].keys()
    for i, s in state["state"].items():
        assert s.keys() == expect["state"][i].keys()
        for key, v in s.items():
            assert torch.equal(v, expect["state"][i][key]) and v.dtype == expect["state"][i][key].dtype, (i, key)


def test_continual_update_steps_on_with_a_non_finite_gradient_outside_the_subsets():
    # Only the entries a step reads are checked: an inf gradient on an entry the masks close is
    # never read, so the update is taken and equals the one without it, bit for bit.
    model, masks = _bert_with_open_masks("de", "fr")
    first = next(iter(masks["de"]))
    for lang in masks:
        masks[lang][first] = masks[lang][first].clone()
        masks[lang][first].view(-1)[0] = False
    twin = copy.deepcopy(model)
    good = dict(_mixed_batch(1, b=2), language_ids=torch.tensor([0, 1]))

    def loss_fn(m, b):  # the inf gradient lands on weight `first`'s entry 0, which no mask opens
        w = dict(m.named_parameters())[first].reshape(-1)[0]
        return m(**b).loss + (w - w.detach()).abs().sqrt()

    torch.manual_seed(0)
    continual.continual_update(twin, [good], masks, lr=1e-2, progress=False)
    torch.manual_seed(0)
    continual.continual_update(model, [good], masks, lr=1e-2, loss_fn=loss_fn, progress=False)
    expect = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, expect[n]), n
