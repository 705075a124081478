"""Language subnetworks: importance and per-entry masks, structured (head/neuron) masks, dynamic
re-selection, first-order MAML against a plain-torch restatement, Reptile, and mixed-language
training that never builds a dense gradient per language."""
import copy
import math
import os
import re
import warnings

import pytest
import torch
from tiny_models import SHARDING, VOCAB, ask_for_sharding, tiny
from torch.utils._python_dispatch import TorchDispatchMode

import xlsparse
from xlsparse import hf
from xlsparse.hf import subnetworks

transformers = pytest.importorskip("transformers")


def _lm_batches(n, seed, b=4, s=8):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in (torch.randint(3, VOCAB, (b, s), generator=g) for _ in range(n))]


def test_importance_masks_and_dynamic_reselection():
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    scores = subnetworks.importance_scores(model, {"de": _lm_batches(2, 1), "fr": _lm_batches(2, 2)},
                                           params=names, progress=False)
    assert set(scores) == {"de", "fr"} and all(float(s.sum()) > 0 for s in scores["de"].values())
    fisher = subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, method="fisher", params=names, progress=False)
    assert float(fisher["de"][names[0]].sum()) > 0
    masks = subnetworks.select_masks(scores, density=0.1)
    total = sum(m.numel() for m in masks["de"].values())
    assert sum(int(m.sum()) for m in masks["de"].values()) == round(0.1 * total)

    hf.convert(model, kind="subnetwork", masks=masks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = xlsparse.optim.MaskedAdamW(trainable, [None] * len(trainable), lr=1e-3)
    new_masks = subnetworks.select_masks(subnetworks.importance_scores(
        model, {"de": _lm_batches(1, 5), "fr": _lm_batches(1, 6)}, params=names, progress=False), density=0.05)
    subnetworks.set_masks(model, new_masks, opt)
    layer = model.get_submodule(names[0][: -len(".weight")])
    assert torch.equal(layer.trainable_mask(), new_masks["de"][names[0]] | new_masks["fr"][names[0]])


def test_an_optimizer_not_re_masked_after_set_masks_refuses_to_step():
    """set_masks without optimizer= left a MaskedAdamW over the layers stepping the old union of
    the masks: the new entries never trained and the dropped ones went on moving with AdamW's
    momentum. The optimizer now refuses its next step, before writing anything; re-masked (or
    after a set_masks that keeps the union) it steps."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    draw = lambda: {lang: {n: torch.rand(named[n].shape, generator=g) < 0.2 for n in names}  # noqa: E731
                    for lang in ("de", "fr")}
    masks = draw()
    hf.convert(model, kind="subnetwork", masks=masks)
    named = dict(model.named_parameters())
    weights = [named[n] for n in names]
    layers = [model.get_submodule(n[: -len(".weight")]) for n in names]
    opt = xlsparse.optim.MaskedAdamW(weights, [layer.trainable_mask() for layer in layers], lr=1e-2)
    for w in weights:
        w.grad = torch.ones_like(w)
    subnetworks.set_masks(model, {"de": masks["fr"], "fr": masks["de"]})  # the union is the same: nothing to follow
    opt.step()
    subnetworks.set_masks(model, draw())
    before = [w.detach().clone() for w in weights]
    with pytest.raises(ValueError, match=r"MaskedAdamW.step: the trainable entries of the SubnetworkLinear weights "
                                         r"\[0, 1, .*changed after this optimizer was masked"):
        opt.step()
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    opt.update_masks({layer.weight: layer.trainable_mask() for layer in layers})
    opt.step()
    subnetworks.set_masks(model, draw(), opt)
    opt.step()
    assert all(not torch.equal(w, b) for w, b in zip(weights, before))


def test_an_optimizer_state_saved_after_set_masks_loads_only_onto_layers_given_those_masks():
    """A manual resume: the layers' masks are not in model.state_dict(), and the loaded optimizer
    state's masks win over those given. Loaded onto layers that kept the masks of convert, it
    stepped the re-selected entries while the layers masked the gradients by the old ones: the
    resumed run differed from the uninterrupted one, silently. It is refused, with nothing loaded;
    after set_masks with the saved run's masks it loads and the run continues bit-exactly."""
    def run(model, steps, opt):
        for _ in range(steps):
            with hf.route(model, torch.tensor([0, 1, 0, 1])):
                model(**_lm_batches(1, 3)[0]).loss.backward()
            opt.step()
            opt.zero_grad()

    def build():
        model = tiny("bert")
        names = [f"{n}.weight" for n in hf.model.target_names(model)]
        g = torch.Generator().manual_seed(0)
        draw = lambda: {lang: {n: torch.rand(model.get_parameter(n).shape, generator=g) < 0.3  # noqa: E731
                               for n in names} for lang in ("de", "fr")}
        hf.convert(model, kind="subnetwork", masks=draw())
        return model.train(), draw()

    def optimizer(model):
        layers = dict(hf.model._converted(model, SubnetworkLinear))
        weights = [layer.weight for layer in layers.values()]
        return xlsparse.optim.MaskedAdamW(weights, [layer.trainable_mask() for layer in layers.values()], lr=1e-2)

    from xlsparse.nn import SubnetworkLinear

    model, reselected = build()
    opt = optimizer(model)
    run(model, 1, opt)
    subnetworks.set_masks(model, reselected, opt)
    state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(1)  # dropout
    run(model, 2, opt)

    resumed, _ = build()
    resumed.load_state_dict(state)
    opt2 = optimizer(resumed)
    before = copy.deepcopy(opt2.state_dict())
    with pytest.raises(ValueError, match=r"load_state_dict: param 0 is a SubnetworkLinear weight, and the state masks "
                                         r"other entries than the union of the layer's masks .* nothing was loaded"):
        opt2.load_state_dict(opt_state)
    after = opt2.state_dict()["state"]
    assert all(torch.equal(t, before["state"][i][key]) for i, st in after.items() for key, t in st.items()
               if isinstance(t, torch.Tensor))
    subnetworks.set_masks(resumed, reselected, opt2)
    opt2.load_state_dict(copy.deepcopy(opt_state))  # a load may keep the dict's tensors: a copy for each
    torch.manual_seed(1)
    run(resumed, 2, opt2)
    for n, p in model.named_parameters():
        assert torch.equal(resumed.get_parameter(n), p), n
    # set_masks without optimizer=, then the load: the loaded masks are the layers' now, so the
    # steps go on (the step's check that the layers' masks moved since the optimizer was masked)
    again, _ = build()
    again.load_state_dict(state)
    opt3 = optimizer(again)
    subnetworks.set_masks(again, reselected)
    opt3.load_state_dict(copy.deepcopy(opt_state))
    torch.manual_seed(1)
    run(again, 2, opt3)
    for n, p in model.named_parameters():
        assert torch.equal(again.get_parameter(n), p), n


def test_select_masks_refuses_a_language_none_of_whose_examples_was_scored():
    """No batches, or none with a labelled token, score a language 0 everywhere: its top-K was the
    first K entries by position (rows of the word embeddings), a subnetwork chosen by nothing."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    unlabelled = [{**b, "labels": torch.full_like(b["labels"], -100)} for b in _lm_batches(1, 2)]
    scores = subnetworks.importance_scores(model, {"de": _lm_batches(1, 1), "fr": unlabelled, "it": []},
                                           params=names, progress=False)
    for lang in ("fr", "it"):
        with pytest.raises(ValueError, match=rf"scores\['{lang}'\] are all zero"):
            subnetworks.select_masks({"de": scores["de"], lang: scores[lang]}, density=0.1)
    assert subnetworks.select_masks({"fr": scores["fr"]}, density=0.0)["fr"][names[0]].sum() == 0  # nothing asked
    masks = subnetworks.select_masks({"de": scores["de"]}, density=0.1)["de"]
    # every entry chosen has a score above zero, none by position
    assert all(bool((scores["de"][n][m] > 0).all()) for n, m in masks.items())


@pytest.mark.parametrize("method", ["grad_x_weight", "fisher"])
def test_importance_sums_per_example_gradients_whatever_the_batching(method):
    """Σ_i |∂ℓ_i/∂θ · θ| and Σ_i (∂ℓ_i/∂θ)², ℓ_i example i's mean token loss, restated from one
    forward with per-token losses; one batch of 4 or two of 2 give the same scores, and an
    example without labelled tokens adds nothing."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:4]
    named = dict(model.named_parameters())
    ids = _lm_batches(1, 3, b=4)[0]["input_ids"]
    labels = ids.clone()
    labels[3] = -100
    logits = model(input_ids=ids).logits
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1), reduction="none")
    want = {n: torch.zeros_like(named[n]) for n in names}
    for i in range(3):
        grads = torch.autograd.grad(token_loss.reshape(4, -1)[i].mean(), [named[n] for n in names], retain_graph=True)
        for n, g in zip(names, grads):
            want[n] += (g * named[n]).abs() if method == "grad_x_weight" else g.square()
    one = subnetworks.importance_scores(model, {"de": [{"input_ids": ids, "labels": labels}]}, method=method,
                                        params=names, progress=False)["de"]
    two = subnetworks.importance_scores(model, {"de": [{"input_ids": ids[:2], "labels": labels[:2]},
                                                       {"input_ids": ids[2:], "labels": labels[2:]}]},
                                        method=method, params=names, progress=False)["de"]
    for n in names:
        torch.testing.assert_close(one[n], want[n].detach(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(two[n], one[n], rtol=1e-5, atol=1e-9)


def _bf16_examples(n=3):
    """A bfloat16 tiny BERT and n one-example batches (labels: the ids)."""
    ids = torch.randint(0, VOCAB, (n, 8), generator=torch.Generator().manual_seed(3))
    return tiny("bert").to(torch.bfloat16), [{"input_ids": ids[i: i + 1], "labels": ids[i: i + 1]} for i in range(n)]


def test_importance_of_a_bfloat16_model_multiplies_in_float32():
    """Σ_i |∂ℓ_i/∂θ · θ| restated in float64 from the model's bfloat16 gradients and weights; the
    product taken in bfloat16 rounded each term, 0.3% off."""
    model, examples = _bf16_examples()
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:4]
    named = dict(model.named_parameters())
    want = {n: torch.zeros(named[n].shape, dtype=torch.float64) for n in names}
    for example in examples:
        for n, g in zip(names, torch.autograd.grad(model(**example).loss, [named[n] for n in names])):
            want[n] += (g.double() * named[n].double()).abs()
    got = subnetworks.importance_scores(model, {"de": examples}, params=names, progress=False)["de"]
    for n in names:
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-6, atol=0)


def test_structured_importance_of_a_bfloat16_model_multiplies_in_float32():
    """|Σ_t o_t · ∂ℓ_i/∂o_t| per head (neuron), summed over examples, restated in float64 from the
    bfloat16 input of the O (FFN-out) projection and its gradient, read by module hooks; the
    product taken in bfloat16 rounded each term, 0.7% off."""
    model, examples = _bf16_examples()
    _, layers = subnetworks.block_layout(model)
    modules = dict(model.named_modules())
    want = {}
    for example in examples:
        seen, hooks = {}, []
        for j, layer in enumerate(layers):
            for key in ("o", "ffn_out"):
                module = modules[layer[key]]
                hooks.append(module.register_forward_hook(
                    lambda m, args, out, k=(key, j): seen.__setitem__(k + ("o",), args[0].detach())))
                hooks.append(module.register_full_backward_hook(
                    lambda m, grad_in, grad_out, k=(key, j): seen.__setitem__(k + ("g",), grad_in[0])))
        model(**example).loss.backward()
        for h in hooks:
            h.remove()
        for j in range(len(layers)):
            for key, groups in (("o", 2), ("ffn_out", None)):
                gate = (seen[key, j, "o"].double() * seen[key, j, "g"].double()).sum((0, 1))
                gate = gate.reshape(groups, -1).sum(1) if groups else gate
                want[key, j] = want.get((key, j), 0) + gate.abs()
    model.zero_grad(set_to_none=True)
    heads, neurons = subnetworks.structured_importance(model, examples)
    for j in range(len(layers)):
        torch.testing.assert_close(heads[j].double(), want["o", j], rtol=1e-5, atol=0)
        torch.testing.assert_close(neurons[j].double(), want["ffn_out", j], rtol=1e-5, atol=0)


def test_reptile_step_updates_only_the_subnetworks():
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.1 for n in names} for lang in ("de", "fr")}
    before = {n: named[n].detach().clone() for n in names}
    losses = subnetworks.reptile_step(model, {"de": _lm_batches(2, 1), "fr": _lm_batches(2, 2)}, masks,
                                      inner_lr=0.1, outer_lr=0.5, inner_steps=2)
    assert set(losses) == {"de", "fr"}
    for n in names:
        union = masks["de"][n] | masks["fr"][n]
        assert torch.equal(named[n][~union], before[n][~union])
        assert bool((named[n][union] != before[n][union]).any())


def test_reptile_step_of_bfloat16_weights_rounds_the_update_once():
    """θ ← θ + ε · mean_l(θ_l − θ) restated in float64 from the θ_l each language reached, rounded
    once to bfloat16. Summed in bfloat16, a language's move of +64 and another's of −64 absorbed
    the small moves before them: the first entry stayed 1.0, four ulps off."""
    theta = torch.tensor([1.0, 3.0, -0.5, 0.75], dtype=torch.bfloat16)
    grads = {"a": [-0.125, 0.0625, 0.01, -0.3], "b": [-0.125, 0.2, -0.04, 0.02],
             "c": [-64.0, -20.0, 3.0, 0.5], "d": [64.0, 19.0, -3.0, -0.4]}
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(theta.clone())
    seen = {lang: [] for lang in grads}

    def loss_fn(m, batch):  # step 1 moves θ by −lr·g; step 2 (zero gradient) shows θ_l
        seen[batch["lang"]].append(m.w.detach().clone())
        g = torch.tensor(grads[batch["lang"]]) if len(seen[batch["lang"]]) == 1 else torch.zeros(4)
        return (m.w * g.to(torch.bfloat16)).sum()

    masks = {lang: {"w": torch.ones(4, dtype=torch.bool)} for lang in grads}
    batches = {lang: [{"lang": lang, "x": torch.zeros(1)}] for lang in grads}
    subnetworks.reptile_step(model, batches, masks, inner_lr=1.0, outer_lr=0.5, inner_steps=2, loss_fn=loss_fn)
    start = theta.double()
    want = start + 0.5 * torch.stack([seen[lang][1].double() - start for lang in grads]).mean(0)
    assert torch.equal(model.w.detach(), want.to(torch.bfloat16))


def test_fomaml_step_of_bfloat16_weights_rounds_the_outer_gradient_once():
    """The outer gradient mean_l ∂L_l/∂θ restated in float64 from each language's query gradient
    (the constant c_l of a loss θ · c_l), rounded once to bfloat16. Summed in bfloat16, the +64 and
    −64 of two languages absorbed the others' 0.125s: the first entry's mean came out 0, not 0.0625."""
    grads = {"a": [0.125, 0.0625, 0.01, -0.3], "b": [0.125, 0.2, -0.04, 0.02],
             "c": [64.0, -20.0, 3.0, 0.5], "d": [-64.0, 19.0, -3.0, -0.4]}
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))

    def loss_fn(m, batch):  # support batches have c = 0 (the inner step moves nothing); query batches c_l
        return (m.w * batch["c"]).sum()

    support = {lang: {"c": torch.zeros(4, dtype=torch.bfloat16)} for lang in grads}
    query = {lang: {"c": torch.tensor(c, dtype=torch.bfloat16)} for lang, c in grads.items()}
    masks = {lang: {"w": torch.ones(4, dtype=torch.bool)} for lang in grads}
    outer = subnetworks.fomaml_optimizer(model, masks, lr=0.0)
    subnetworks.fomaml_step(model, support, query, masks, 0.1, 1, outer, loss_fn=loss_fn)
    want = torch.stack([query[lang]["c"].double() for lang in grads]).mean(0)
    assert torch.equal(model.w.grad, want.to(torch.bfloat16))


def test_reptile_step_refuses_a_bad_outer_lr_or_inner_steps_before_any_step():
    # outer_lr=NaN ran every inner step, then wrote NaN into every trainable parameter; inner_steps=1.5
    # failed in itertools.islice (fomaml_step: in range()) with a message that named no argument
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names}}
    before = {n: p.detach().clone() for n, p in named.items()}
    with pytest.raises(ValueError, match="reptile_step: outer_lr must be finite, got nan"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, masks, inner_lr=0.1, outer_lr=float("nan"))
    # a negative outer_lr stepped θ away from every language's adapted weights, silently
    with pytest.raises(ValueError, match=r"reptile_step: outer_lr must be >= 0 \(invalid learning rate\), got -0.5"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, masks, inner_lr=0.1, outer_lr=-0.5)
    with pytest.raises(TypeError, match="reptile_step: inner_steps must be an int, got 1.5"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, masks, inner_lr=0.1, inner_steps=1.5)
    batch = _lm_batches(1, 1)
    with pytest.raises(TypeError, match="fomaml_step: inner_steps must be an int, got 1.5"):
        subnetworks.fomaml_step(model, {"de": batch}, {"de": batch[0]}, masks, 0.1, 1.5,
                                subnetworks.fomaml_optimizer(model, masks, lr=0.1))
    assert all(torch.equal(p, before[n]) for n, p in named.items())


def test_reptile_and_fomaml_route_a_converted_opt_by_one_id_per_token():
    # OPT's fc1 and fc2 see the tokens flattened to [B·S, H]: a one-language batch was routed by one id
    # per example, and every inner step of a converted OPT raised a route error asking for per-token ids
    def opt():
        torch.manual_seed(0)
        return transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=48,
            max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)).eval()

    plain, model = opt(), opt()
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(dict(model.named_parameters())[n].shape, generator=g) < 0.2 for n in names}
             for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=masks)
    batches = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    for m in (plain, model):
        subnetworks.reptile_step(m, batches, masks, inner_lr=0.1, outer_lr=0.5)
        query = {lang: b[0] for lang, b in batches.items()}
        subnetworks.fomaml_step(m, batches, query, masks, 0.1, 1, subnetworks.fomaml_optimizer(m, masks, lr=0.1))
    for n in names:
        torch.testing.assert_close(dict(model.named_parameters())[n], dict(plain.named_parameters())[n])


def test_progress_must_be_a_bool():
    # bool("no") is True: progress="no" showed the bars it was meant to hide
    model = tiny("bert")
    named = dict(model.named_parameters())
    first = f"{hf.model.target_names(model)[0]}.weight"
    masks = {"de": {first: torch.ones_like(named[first], dtype=torch.bool)}}
    before = {n: p.detach().clone() for n, p in named.items()}
    batches = _lm_batches(1, 1)
    calls = {"importance_scores": lambda: subnetworks.importance_scores(model, {"de": batches}, progress="no"),
             "reptile_step": lambda: subnetworks.reptile_step(model, {"de": batches}, masks, progress="no"),
             "structured_importance": lambda: subnetworks.structured_importance(model, batches, progress="no")}
    for what, call in calls.items():
        with pytest.raises(TypeError, match=f"{what}: progress must be a bool, got 'no'"):
            call()
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_scoring_refuses_an_infinite_loss_whose_gradient_is_inf_or_nan():
    # the backward of an infinite loss added inf/NaN into the scores, silently (a NaN loss is skipped)
    model = tiny("bert")
    infinite = lambda m, b: m(**b).loss / 0.0  # noqa: E731
    with pytest.raises(ValueError, match=r"^importance_scores: an example of 'de' has an infinite loss \(inf\)"):
        subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, loss_fn=infinite, progress=False)
    with pytest.raises(ValueError, match=r"^structured_importance: an example has an infinite loss \(inf\)"):
        subnetworks.structured_importance(model, _lm_batches(1, 1), loss_fn=infinite)
    assert all(p.grad is None for p in model.parameters())


def test_scoring_refuses_one_batch_where_a_list_of_batches_goes():
    # iterating one batch (a dict) gave its keys, read as batches: an AttributeError on a str's .values
    model = tiny("bert")
    batch = _lm_batches(1, 1)[0]
    with pytest.raises(TypeError, match=r"^importance_scores: batches\['de'\] .* one batch \(a dict\): pass \[batch\]"):
        subnetworks.importance_scores(model, {"de": batch}, progress=False)
    with pytest.raises(TypeError, match=r"^structured_importance: batches .* one batch \(a dict\): pass \[batch\]"):
        subnetworks.structured_importance(model, batch)
    # one batch where {language: batches} goes: its field names were read as languages
    with pytest.raises(TypeError, match=r"^importance_scores: batches\['input_ids'\] .* a tensor.*\{language: \[batch"):
        subnetworks.importance_scores(model, batch, progress=False)
    with pytest.raises(TypeError, match=r"^importance_scores: batches must map each language to its batches"):
        subnetworks.importance_scores(model, [batch], progress=False)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("recipe", ["reptile", "fomaml"])
def test_meta_learning_trains_the_modules_to_save_whole(recipe):
    """convert's modules_to_save (a new head) train whole in each language's inner loop and in the
    outer step, as SubnetworkTrainer trains them (they once stayed fixed): the step equals that of
    the plain model given all-true masks on the head's parameters."""
    model = tiny("bert").eval()
    plain = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    head = [n for n in named if n.startswith("cls.predictions.transform.")]
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    whole = {lang: {**m, **{n: torch.ones(named[n].shape, dtype=torch.bool) for n in head}} for lang, m in masks.items()}
    hf.convert(model, kind="subnetwork", masks=masks, modules_to_save=["cls.predictions.transform"])
    before = {n: named[n].detach().clone() for n in head}
    support = {"de": _lm_batches(2, 1), "fr": _lm_batches(2, 2)}
    if recipe == "reptile":
        subnetworks.reptile_step(model, support, masks, inner_lr=0.1, inner_steps=2)
        subnetworks.reptile_step(plain, support, whole, inner_lr=0.1, inner_steps=2)
    else:
        query = {"de": _lm_batches(1, 3)[0], "fr": _lm_batches(1, 4)[0]}
        subnetworks.fomaml_step(model, support, query, masks, 0.5, 2, subnetworks.fomaml_optimizer(model, masks, lr=1e-2))
        subnetworks.fomaml_step(plain, support, query, whole, 0.5, 2, subnetworks.fomaml_optimizer(plain, whole, lr=1e-2))
    after, want = dict(model.named_parameters()), dict(plain.named_parameters())
    for n in head:
        assert not torch.equal(after[n], before[n]), n
        torch.testing.assert_close(after[n], want[n], rtol=1e-5, atol=1e-7)
    # A part of the saved module that the user froze stays as it is (it once failed: KeyError).
    frozen = "cls.predictions.transform.LayerNorm.weight"
    after[frozen].requires_grad_(False)
    kept = after[frozen].detach().clone()
    if recipe == "reptile":
        subnetworks.reptile_step(model, support, masks, inner_lr=0.1, inner_steps=2)
    else:
        subnetworks.fomaml_step(model, support, query, masks, 0.5, 2, subnetworks.fomaml_optimizer(model, masks, lr=1e-2))
    assert torch.equal(after[frozen], kept)


def _own_layout(model, tensors):
    """{name: tensor} in the model's own layout (a converted GPT-2 Conv1D weight back to [in, out])."""
    return hf.model._swap_conv1d_layout(model, tensors)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_reptile_step_and_importance_on_a_converted_model_route_each_language(arch):
    """A converted model trains nothing unrouted; the recipes route each language's batches. The
    masks and scores are in the model's own layout on a converted model too (GPT-2's Conv1D
    [in, out], stored [out, in] once converted): the step and the scores equal those of the
    unconverted model."""
    model = tiny(arch).eval()  # no dropout: the twin must see the same forward
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.1 for n in names} for lang in ("de", "fr")}
    plain = copy.deepcopy(model)
    hf.convert(model, kind="subnetwork", masks=masks)
    before = _own_layout(model, {n: p.detach().clone() for n, p in model.named_parameters()})
    batches = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    subnetworks.reptile_step(model, batches, masks, inner_lr=0.1)
    subnetworks.reptile_step(plain, batches, masks, inner_lr=0.1)
    after = _own_layout(model, {n: p.detach() for n, p in model.named_parameters()})
    plain_named = dict(plain.named_parameters())
    for n in names:
        union = masks["de"][n] | masks["fr"][n]
        assert torch.equal(after[n][~union], before[n][~union])
        assert bool((after[n][union] != before[n][union]).any()), n
        torch.testing.assert_close(after[n], plain_named[n].detach(), rtol=1e-5, atol=1e-7)
    plain = hf.merge_and_unload(copy.deepcopy(model)).requires_grad_(True)  # the same weights, not converted
    batches = {"de": _lm_batches(1, 3)}
    scores = subnetworks.importance_scores(model, batches, params=names, progress=False)
    want = subnetworks.importance_scores(plain, batches, params=names, progress=False)
    for n in names:  # the full gradient reaches the scores, outside "de"'s current mask too
        torch.testing.assert_close(scores["de"][n], want["de"][n])
        assert float(scores["de"][n][~masks["de"][n]].sum()) > 0
    top = subnetworks.select_masks(scores, 0.1)  # scores -> masks -> layers, all in the model's own layout
    subnetworks.set_masks(model, {"de": top["de"], "fr": masks["fr"]})
    layers = dict(hf.model._converted(model))
    for n in names:
        layer = layers[n[: -len(".weight")]]
        assert torch.equal(_own_layout(model, {n: layer.masks[0]})[n], top["de"][n]), n


def test_masked_recipes_name_the_layout_of_a_mask_of_the_wrong_shape():
    model = tiny("gpt2")
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D [32, 96]: the mask must be [in, out]
    good = {"de": {name: torch.ones(32, 96, dtype=torch.bool)}}
    hf.convert(model, [name[: -len(".weight")]], kind="subnetwork", masks=good)
    bad = {"de": {name: torch.ones(96, 32, dtype=torch.bool)}}
    before = dict((n, p.detach().clone()) for n, p in model.named_parameters())
    for call in (lambda: subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, bad),
                 lambda: subnetworks.fomaml_optimizer(model, bad),
                 lambda: subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)[0]}, bad,
                                                 0.1, 1, subnetworks.fomaml_optimizer(model, good))):
        with pytest.raises(ValueError, match=r"masks\['de'\]\['transformer.h.0.attn.c_attn.weight'\] must be a bool "
                                             r"tensor of shape \(32, 96\) \(the model's own layout"):
            call()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="no masks for languages"):
        subnetworks.reptile_step(model, {"fr": _lm_batches(1, 1)}, good)
    with pytest.raises(ValueError, match="unknown parameter 'nope.weight'"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, {"de": {"nope.weight": good["de"][name]}})


def test_meta_steps_refuse_lists_or_one_language_s_masks_where_language_mappings_go():
    # a list of batches failed as "unhashable type: 'list'"; one language's masks as a bare AttributeError
    model = tiny("bert")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    masks = {"de": {name: torch.ones_like(dict(model.named_parameters())[name], dtype=torch.bool)}}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"^reptile_step: batches must map each language to its batches.*got a list"):
        subnetworks.reptile_step(model, _lm_batches(1, 1), masks)
    with pytest.raises(TypeError, match=r"^reptile_step: masks must map each language to its masks.*got a list"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, [masks["de"]])
    with pytest.raises(TypeError, match=r"^reptile_step: masks\['de'\] must be \{parameter name: bool tensor\}, got a "
                                        r"Tensor"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, {"de": masks["de"][name]})
    with pytest.raises(TypeError, match=rf"^fomaml_optimizer: masks\['{name}'\] must be \{{parameter name: bool "
                                        r"tensor\}, got a Tensor; masks map each language"):
        subnetworks.fomaml_optimizer(model, masks["de"])
    opt = subnetworks.fomaml_optimizer(model, masks)
    support, query = {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)[0]}
    for arg, call in (("support", lambda: subnetworks.fomaml_step(model, support["de"], query, masks, 0.1, 1, opt)),
                      ("query", lambda: subnetworks.fomaml_step(model, support, [query["de"]], masks, 0.1, 1, opt)),
                      ("masks", lambda: subnetworks.fomaml_step(model, support, query, [masks["de"]], 0.1, 1, opt))):
        with pytest.raises(TypeError, match=rf"^fomaml_step: {arg} must map each language to .*got a list"):
            call()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def _converted_fomaml_matches_plain(model, twin, names, masks, support, query):
    """Convert `model`'s `names` with `masks`, take one fomaml_step (inner lr 0.5, 2 inner steps), and
    check its outer gradients against `_plain_fomaml` on the unconverted `twin`; returns those."""
    hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    subnetworks.fomaml_step(model, support, query, masks, inner_lr=0.5, inner_steps=2, outer_optimizer=opt)
    expect = _plain_fomaml(twin, support, query, masks, inner_lr=0.5, inner_steps=2)
    named = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(named[n].grad, expect[n], rtol=1e-5, atol=1e-7)
    return expect


def _plain_fomaml(model, support, query, masks, inner_lr, inner_steps):
    """First-order MAML restated in plain torch: per language, inner SGD on the support batch
    with the gradient masked (`inner_lr`: a number, or a function of the parameter's name), the
    masked query gradient at the adapted weights, weights restored; the outer gradient is the mean
    over languages."""
    lr_of = inner_lr if callable(inner_lr) else (lambda name: inner_lr)
    named = dict(model.named_parameters())
    outer = {}
    for lang in support:
        params = {n: named[n] for n in masks[lang]}
        saved = {n: p.detach().clone() for n, p in params.items()}
        for step in range(inner_steps):
            grads = torch.autograd.grad(model(**support[lang][step % len(support[lang])]).loss, list(params.values()))
            with torch.no_grad():
                for (n, p), g in zip(params.items(), grads):
                    p -= lr_of(n) * g * masks[lang][n]
        grads = torch.autograd.grad(model(**query[lang]).loss, list(params.values()))
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                outer[n] = outer.get(n, 0) + g * masks[lang][n] / len(support)
                p.copy_(saved[n])
    return outer


def _fomaml_setup(arch="bert", support_batches=2):
    """A tiny model, its untouched twin, six target weights' names, two languages' random masks,
    support batches and one query batch per language."""
    model = tiny(arch)
    twin = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:6]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    support = {"de": _lm_batches(support_batches, 1), "fr": _lm_batches(support_batches, 2)}
    query = {"de": _lm_batches(1, 3)[0], "fr": _lm_batches(1, 4)[0]}
    return model, twin, names, masks, support, query


@pytest.mark.parametrize("arch, converted", [("bert", False), ("bert", True), ("gpt2", True)])
def test_fomaml_outer_gradient_and_step_match_plain_torch(arch, converted):
    """The same step on a plain model and on one converted with kind="subnetwork" over the same
    masks (whose layers train nothing unless each language's batches are routed; GPT-2's masks
    stay in its Conv1D layout [in, out] while the converted weights are stored [out, in])."""
    model, twin, names, masks, support, query = _fomaml_setup(arch)
    named = dict(model.named_parameters())
    if converted:
        hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
        named = dict(model.named_parameters())  # a converted Conv1D's weight is a new [out, in] parameter
    before = _own_layout(model, {n: p.detach().clone() for n, p in named.items()})
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2, weight_decay=0.1)
    losses = subnetworks.fomaml_step(model, support, query, masks, inner_lr=0.5, inner_steps=3, outer_optimizer=opt)
    assert set(losses) == {"de", "fr"}

    expect = _plain_fomaml(twin, support, query, masks, inner_lr=0.5, inner_steps=3)
    grads = _own_layout(model, {n: named[n].grad for n in names})
    for n in names:
        torch.testing.assert_close(grads[n], expect[n], rtol=1e-5, atol=1e-7)
    # The outer step is AdamW confined to the union of the subnetworks (weight decay included).
    twin_named = dict(twin.named_parameters())
    plain = torch.optim.AdamW([twin_named[n] for n in names], lr=1e-2, weight_decay=0.1)
    for n in names:
        twin_named[n].grad = expect[n]
    plain.step()
    named = _own_layout(model, {n: p.detach() for n, p in named.items()})
    for n, p in named.items():
        if n in names:
            union = masks["de"][n] | masks["fr"][n]
            torch.testing.assert_close(p[union], twin_named[n][union], rtol=1e-5, atol=1e-6)
            assert torch.equal(p[~union], before[n][~union])
        else:
            assert torch.equal(p, before[n]), n
    with pytest.raises(TypeError, match="masked optimizer"):
        subnetworks.fomaml_step(model, support, query, masks, 0.5, 1, torch.optim.AdamW(model.parameters()))


def test_meta_steps_train_a_converted_sequence_classifier_head_that_sees_one_row_per_example():
    """XLM-R's classifier.dense runs on the pooled first token, [B, H]: the one-language batches,
    routed one id per token, raised there ("fit neither"). The step equals the plain-torch one."""
    cfg = transformers.XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=40, pad_token_id=1, num_labels=3)
    torch.manual_seed(0)
    model = transformers.XLMRobertaForSequenceClassification(cfg).eval()
    twin = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model, ["query", "classifier.dense"])]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.4 for n in names} for lang in ("de", "fr")}

    def batches(n, seed):
        gen = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(3, VOCAB, (4, 7), generator=gen),
                 "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(n)]

    support, query = {"de": batches(2, 1), "fr": batches(2, 2)}, {"de": batches(1, 3)[0], "fr": batches(1, 4)[0]}
    expect = _converted_fomaml_matches_plain(model, twin, names, masks, support, query)
    assert bool(expect["classifier.dense.weight"].any())
    subnetworks.reptile_step(model, {"de": support["de"], "fr": support["fr"]}, masks, inner_steps=2)


def test_meta_steps_route_deberta_s_shared_relative_rows_of_a_one_language_batch_to_that_language():
    """DeBERTa's query_proj and key_proj also run on the relative-position embeddings [1, 2·span, H],
    rows every example of the batch shares: a one-language batch of more than one example raised
    there ("fit neither the batch's examples [1]"), though every row is that language's. The outer
    gradient equals the plain-torch one; Reptile's step equals the step on the unconverted twin, also
    when the batches carry their `language_ids` field (model(**batch) routes by it)."""
    cfg = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=48, max_position_embeddings=64, relative_attention=True,
                                       position_buckets=4, max_relative_positions=64, pos_att_type=["p2c", "c2p"],
                                       share_att_key=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.DebertaV2ForMaskedLM(cfg).eval()
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model, ["query_proj", "key_proj", "value_proj"])]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.4 for n in names} for lang in ("de", "fr")}
    support = {"de": _lm_batches(2, 1), "fr": _lm_batches(2, 2)}  # 4 examples a batch
    query = {"de": _lm_batches(1, 3)[0], "fr": _lm_batches(1, 4)[0]}
    expect = _converted_fomaml_matches_plain(model, twin, names, masks, support, query)
    assert all(bool(expect[n].any()) for n in names)
    named = dict(model.named_parameters())
    plain_named = dict(plain.named_parameters())
    with torch.no_grad():  # the twin from the weights the outer step left
        for n in names:
            plain_named[n].copy_(named[n])
    before = {n: named[n].detach().clone() for n in names}
    # the converted model's batches carry their language_ids field, which model(**batch) routes by
    fielded = {lang: [{**b, "language_ids": torch.full((4,), i)} for b in support[lang]]
               for i, lang in enumerate(support)}
    subnetworks.reptile_step(model, fielded, masks, inner_lr=0.1, outer_lr=0.5, inner_steps=2)
    subnetworks.reptile_step(plain, support, masks, inner_lr=0.1, outer_lr=0.5, inner_steps=2)
    for n in names:
        assert not torch.equal(named[n], before[n])
        torch.testing.assert_close(named[n], plain_named[n], rtol=1e-5, atol=1e-7)


def test_meta_steps_take_the_batch_size_from_a_field_that_has_one():
    """A batch whose first field is a 0-dim tensor (a loss weight read by loss_fn): its size was read
    from that field's first dim, which it has none of (IndexError). The step equals the one on the
    batch without it."""
    model, twin, names, masks, support, _ = _fomaml_setup(support_batches=1)
    hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
    hf.convert(twin, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
    weighted = {lang: [{"scale": torch.tensor(2.0), **b} for b in bs] for lang, bs in support.items()}
    subnetworks.reptile_step(model, weighted, masks, inner_lr=0.1,
                             loss_fn=lambda m, b: b["scale"] * m(input_ids=b["input_ids"], labels=b["labels"]).loss)
    subnetworks.reptile_step(twin, support, masks, inner_lr=0.2)
    named, twin_named = dict(model.named_parameters()), dict(twin.named_parameters())
    for n in names:
        torch.testing.assert_close(named[n], twin_named[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("converted", [False, True])
def test_fomaml_under_reentrant_gradient_checkpointing_gives_the_outer_gradient_without_it(converted):
    # the query gradient was taken with autograd.grad, whose graph holds no parameter of a layer
    # checkpointed with use_reentrant=True: their outer gradients were None and skipped, silently
    grads = []
    for checkpointing in (False, True):
        model, _, names, masks, support, query = _fomaml_setup(support_batches=1)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if converted:
            hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()  # HF checkpoints in training mode only
        opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
        subnetworks.fomaml_step(model, support, query, masks, inner_lr=0.5, inner_steps=1, outer_optimizer=opt)
        named = dict(model.named_parameters())
        grads.append({n: named[n].grad for n in names})
    for n in names:
        assert grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("op", ["importance_scores", "structured_importance", "reptile_step"])
def test_scores_and_reptile_under_gradient_checkpointing_equal_those_without_it(op):
    # the backward ran after the route (and the unmasking) had ended: checkpointing's recomputation
    # in it raised, with HF's default kwargs and with use_reentrant=True; under use_reentrant=False
    # the head/neuron inputs were taken from the recomputation, which gets no gradient
    def run(kwargs):
        model, _, names, masks, support, _ = _fomaml_setup("llama", support_batches=1)
        hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
        if kwargs is not None:
            model.gradient_checkpointing_enable(kwargs or None)
        model.train()  # HF checkpoints in training mode only
        if op == "importance_scores":
            scores = subnetworks.importance_scores(model, support, params=names, progress=False)
            return [scores[lang][n] for lang in scores for n in names]
        if op == "structured_importance":
            return list(subnetworks.structured_importance(model, support["de"]))
        subnetworks.reptile_step(model, support, masks, inner_lr=0.5)
        return [p.detach() for p in model.parameters()]

    expect = run(None)
    for kwargs in ({}, {"use_reentrant": True}):
        for got, want in zip(run(kwargs), expect):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_fomaml_takes_udify_metalearnings_two_learning_rates_by_parameter_name():
    """udify-metalearning's inner SGD steps BERT at one lr and the decoder at another, and its
    outer Adam has meta_lr_bert and meta_lr_decoder: one lr for everything could not restate it."""
    model, twin, names, masks, support, query = _fomaml_setup()
    named = dict(model.named_parameters())
    inner = {r"layer\.1\.": 0.5, r".": 0.05}
    outer_lr = {r"layer\.1\.": 1e-2, r".": 1e-3}
    opt = subnetworks.fomaml_optimizer(model, masks, lr=outer_lr)
    subnetworks.fomaml_step(model, support, query, masks, inner_lr=inner, inner_steps=2, outer_optimizer=opt)

    def lr_of(table):
        return lambda name: table[r"layer\.1\."] if ".layer.1." in name else table["."]

    expect = _plain_fomaml(twin, support, query, masks, inner_lr=lr_of(inner), inner_steps=2)
    for n in names:
        torch.testing.assert_close(named[n].grad, expect[n], rtol=1e-5, atol=1e-7)
    twin_named = dict(twin.named_parameters())
    for n in names:
        plain = torch.optim.Adam([twin_named[n]], lr=lr_of(outer_lr)(n))
        twin_named[n].grad = expect[n]
        plain.step()
        union = masks["de"][n] | masks["fr"][n]
        torch.testing.assert_close(named[n][union], twin_named[n][union], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"fomaml_step: no pattern of inner_lr matches \['bert.encoder.layer.0"):
        subnetworks.fomaml_step(model, support, query, masks, {r"layer\.1\.": 0.5}, 2, opt)
    with pytest.raises(ValueError, match=r"fomaml_optimizer: no pattern of lr matches"):
        subnetworks.fomaml_optimizer(model, masks, lr={r"layer\.1\.": 0.5})


def test_mask_selection_refuses_negative_or_infinite_importances():
    """Masks keep the largest magnitudes: a score of -5 was chosen before 2 and 1, as the most
    important entry, and an infinite head score became NaN after the per-layer norm."""
    with pytest.raises(ValueError, match=r"select_masks: scores\['de'\] must be finite and >= 0"):
        subnetworks.select_masks({"de": {"w": torch.tensor([1.0, -5.0, 2.0, 0.5])}}, density=0.5)
    model = tiny("bert")
    heads, neurons = torch.rand(2, 2), torch.rand(2, model.config.intermediate_size)
    for bad in (-1.0, math.inf):
        h, n = heads.clone(), neurons.clone()
        h[0, 1] = bad
        n[1, 3] = bad
        for args in ((h, neurons), (heads, n)):
            with pytest.raises(ValueError, match="structured_masks: the scores must be finite and >= 0"):
                subnetworks.structured_masks(model, *args, 0.5, 0.25)


def test_select_masks_names_scores_of_the_wrong_form():
    """{language: {name: tensor}}: a list of languages' scores, or one language's tensor, failed
    with a bare AttributeError on `.items()`, and a list of numbers in torch.isfinite."""
    scores = {"w": torch.rand(4)}
    with pytest.raises(TypeError, match=r"select_masks: scores must map each language to its scores"):
        subnetworks.select_masks([scores], density=0.5)
    with pytest.raises(TypeError, match=r"select_masks: scores\['de'\] must be \{parameter name: tensor of scores\}, "
                                        r"got a Tensor"):
        subnetworks.select_masks({"de": torch.rand(4)}, density=0.5)
    with pytest.raises(TypeError, match=r"scores\['de'\] must be .* got a dict holding other values"):
        subnetworks.select_masks({"de": {"w": [0.1, 0.2]}}, density=0.5)
    assert int(subnetworks.select_masks({"de": scores}, density=0.5)["de"]["w"].sum()) == 2


def test_structured_masks_rank_heads_after_normalising_each_layer():
    # Michel et al. (2019) / the bertology code: a layer's head scores are divided by their l2
    # norm, then ranked globally. Layer 0's scores are 100x layer 1's: raw, it takes both heads.
    model = tiny("bert")
    _, layers = subnetworks.block_layout(model)
    heads = torch.tensor([[300.0, 200.0], [3.0, 1.0]])
    neurons = torch.rand(2, model.config.intermediate_size, generator=torch.Generator().manual_seed(0))

    def open_heads(masks):
        cols = [masks[f"{layer['o']}.weight"].all(0).reshape(2, -1).all(1) for layer in layers]
        return torch.stack(cols)

    normalised = heads / heads.pow(2).sum(1, keepdim=True).sqrt()  # [[.83, .55], [.95, .32]]
    expect = torch.zeros(2, 2, dtype=torch.bool)
    expect.view(-1)[normalised.view(-1).topk(2).indices] = True
    assert torch.equal(expect, torch.tensor([[True, False], [True, False]]))
    assert torch.equal(open_heads(subnetworks.structured_masks(model, heads, neurons, 0.5, 0.25)), expect)
    raw = subnetworks.structured_masks(model, heads, neurons, 0.5, 0.25, normalize_heads_by_layer=False)
    assert torch.equal(open_heads(raw), torch.tensor([[True, True], [False, False]]))
    # "False" is truthy: the heads were normalised, unasked
    with pytest.raises(TypeError, match="structured_masks: normalize_heads_by_layer must be a bool, got 'False'"):
        subnetworks.structured_masks(model, heads, neurons, 0.5, 0.25, normalize_heads_by_layer="False")


def test_structured_masks_refuse_blocks_that_only_look_like_llama_s():
    # XGLM, OPT, mBART and M2M100 name their query projection `layers.<i>.self_attn.q_proj` as Llama
    # does, but their output projection `out_proj` and their FFN `fc1`/`fc2`: the Llama layout was
    # taken, and structured_importance failed with a raw KeyError on `self_attn.o_proj`
    model = tiny("xglm")
    assert "model.layers.0.self_attn.q_proj" in dict(model.named_modules())
    with pytest.raises(ValueError, match="structured subnetworks: unknown architecture"):
        subnetworks.block_layout(model)
    with pytest.raises(ValueError, match="structured subnetworks: unknown architecture"):
        subnetworks.structured_importance(model, _lm_batches(1, 1))


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_structured_masks_select_whole_heads_and_neurons(arch):
    model = tiny(arch)
    _, layers = subnetworks.block_layout(model)
    heads_scores, neuron_scores = subnetworks.structured_importance(model, _lm_batches(2, 1))
    assert heads_scores.shape == (2, 2) and bool((heads_scores > 0).all()) and bool((neuron_scores >= 0).all())
    g = torch.Generator().manual_seed(1)
    masks = {lang: subnetworks.structured_masks(model, torch.rand(heads_scores.shape, generator=g),
                                                torch.rand(neuron_scores.shape, generator=g), 0.5, 0.25)
             for lang in ("de", "fr")}
    for m in masks.values():
        o = [m[f"{layer['o']}.weight"] for layer in layers]
        ffn_out = [m[f"{layer['ffn_out']}.weight"] for layer in layers]
        # every line of a head (neuron) is all open or all closed
        head_cols = [(x.t() if arch == "gpt2" else x).all(0) for x in o]  # O columns (GPT-2: rows)
        assert sum(int(c.reshape(2, -1).all(1).sum()) for c in head_cols) == 2  # half of 2 x 2 heads
        assert all(torch.equal(c.reshape(2, -1).all(1), c.reshape(2, -1).any(1)) for c in head_cols)
        neurons = [(x.t() if arch == "gpt2" else x).all(0) for x in ffn_out]
        assert sum(int(c.sum()) for c in neurons) == round(0.25 * neuron_scores.numel())
    # Training through SubnetworkLinear with routing leaves every other entry bit-identical.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hf.convert(model, list({n[: -len(".weight")] for n in masks["de"]}), kind="subnetwork", masks=masks)
    model.train()
    named = dict(model.named_parameters())
    union = {n: masks["de"][n] | masks["fr"][n] for n in masks["de"]}
    if arch == "gpt2":  # converted Conv1D weights are stored [out, in]
        union = {n: u.t().contiguous() for n, u in union.items()}
        before.update({n: before[n].t() for n in union})
    for p in model.parameters():
        p.requires_grad_(False)
    for n in union:
        named[n].requires_grad_(True)
    opt = xlsparse.optim.MaskedAdamW([named[n] for n in union], list(union.values()), lr=1e-2)
    for batch in _lm_batches(3, 7):
        opt.zero_grad(set_to_none=True)
        with hf.route(model, torch.tensor([0, 1, 0, 1])):
            model(**batch).loss.backward()
        opt.step()
    for n, p in named.items():
        if n in union:
            assert torch.equal(p[~union[n]], before[n][~union[n]]), n
            assert bool((p[union[n]] != before[n][union[n]]).any()), n
        else:
            assert torch.equal(p, before[n]), n


class _CountWeightSized(TorchDispatchMode):
    """Counts the distinct storages of op outputs with a given 2-D shape (dense weight-sized
    gradients; a view such as detach shares its storage and is not counted again)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages, self.ops = tuple(shape), set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.storages.add(t.untyped_storage().data_ptr())
                self.ops.append(str(func))
        return out


def test_mixed_language_backward_builds_no_dense_gradient_per_language():
    layer = torch.nn.Linear(40, 24, bias=False)
    langs = ("a", "b", "c", "d")
    g = torch.Generator().manual_seed(0)
    masks = {lang: torch.rand(24, 40, generator=g) < 0.3 for lang in langs}
    sub = xlsparse.nn.SubnetworkLinear.from_linear(layer, masks)
    x = torch.randn(8, 5, 40, generator=g)
    ids = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y = sub(x, language_ids=ids)
    with _CountWeightSized((24, 40)) as counter:
        y.square().sum().backward()
    # One weight-sized result (the masked gradient itself), not one per language.
    assert len(counter.storages) == 1, counter.ops
    expect = sum(torch.where(masks[lang], (2 * y[ids == i]).reshape(-1, 24).t() @ x[ids == i].reshape(-1, 40), 0)
                 for i, lang in enumerate(langs))
    torch.testing.assert_close(layer.weight.grad, expect.detach(), rtol=1e-5, atol=1e-5)


class _MixedData(torch.utils.data.Dataset):
    """Examples of two languages; `only` keeps one language's examples."""

    def __init__(self, n=16, s=8, seed=0, only=None):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, s), generator=g)
        self.lang = torch.arange(n) % 2 if only is None else torch.full((n,), only)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "language_ids": self.lang[i]}


def _args(tmp_path, steps, **kwargs):
    from transformers import TrainingArguments

    kwargs = {"per_device_train_batch_size": 4, "save_strategy": "no", **kwargs}
    return TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, max_steps=steps,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                             lr_scheduler_type="constant", max_grad_norm=0.0, **kwargs)


def _structured_model(arch, seed=1):
    model = tiny(arch)
    g = torch.Generator().manual_seed(seed)
    heads, neurons = subnetworks.structured_importance(model, _lm_batches(1, 1))
    masks = {lang: subnetworks.structured_masks(model, torch.rand(heads.shape, generator=g),
                                                torch.rand(neurons.shape, generator=g), 0.5, 0.25) for lang in ("de", "fr")}
    hf.convert(model, list({n[: -len(".weight")] for n in masks["de"]}), kind="subnetwork", masks=masks)
    return model, masks


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}])
def test_subnetwork_trainer_trains_under_gradient_checkpointing_as_without_it(tmp_path, kwargs):
    # TrainingArguments(gradient_checkpointing=True) recomputes the layers in the backward, which
    # the Trainer ran after compute_loss's route had ended: the first step raised
    trained = []
    for checkpointing in (False, True):
        model, _ = _structured_model("llama")
        extra = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs} if checkpointing else {}
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2, **extra), train_dataset=_MixedData()).train()
        trained.append(dict(model.named_parameters()))
    for n, p in trained[0].items():
        torch.testing.assert_close(trained[1][n], p, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_subnetwork_trainer_trains_each_language_inside_its_own_subnetwork(tmp_path, arch):
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model(arch)
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Only German examples: entries open to French alone must not move.
    subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 3), train_dataset=_MixedData(only=0)).train()
    moved = 0
    for n, p in model.named_parameters():
        layer = layers.get(n[: -len(".weight")]) if n.endswith(".weight") else None
        if layer is None:
            assert torch.equal(p, before[n]), n
            continue
        de = layer.masks[0]
        assert torch.equal(p[~de], before[n][~de]), n
        moved += int((p[de] != before[n][de]).sum())
    assert moved > 0


def test_subnetwork_trainer_accumulates_gradients_like_one_big_batch(tmp_path):
    """gradient_accumulation_steps=2 over batches of 4 steps on the gradient of the batch of 8,
    inside the masks. Tiny BERT's loss is a mean that ignores num_items_in_batch: transformers 5.25
    added the two micro-batch means (twice the big batch's gradient), and the trainer divides them
    by the accumulation steps (`lt_sft.settle_loss_kwargs`)."""
    from transformers import TrainerCallback
    from xlsparse.nn import SubnetworkLinear

    class _Grads(TrainerCallback):
        def __init__(self, model):
            self.model, self.grads = model, None

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if self.grads is None:
                self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def first_step(batch, accumulation):
        model = tiny("bert")
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        named = dict(model.named_parameters())
        g = torch.Generator().manual_seed(1)
        masks = {lang: {f"{n}.weight": torch.rand(named[f"{n}.weight"].shape, generator=g) < 0.3
                        for n in hf.model.target_names(model)} for lang in ("de", "fr")}
        hf.convert(model, kind="subnetwork", masks=masks)
        grads = _Grads(model)
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1, per_device_train_batch_size=batch,
                                                              gradient_accumulation_steps=accumulation),
                                      train_dataset=_MixedData(n=8), callbacks=[grads]).train()
        return model, grads.grads

    _, big = first_step(8, 1)
    model, accumulated = first_step(4, 2)
    assert set(big) == set(accumulated)
    for n, grad in big.items():
        torch.testing.assert_close(accumulated[n], grad, rtol=1e-4, atol=1e-6)
    for name, layer in hf.model._converted(model, SubnetworkLinear):
        assert not accumulated[f"{name}.weight"][~layer.trainable_mask()].any(), name


def _bert_with_subnetworks_and_head():
    """A tiny BERT converted with random de/fr masks on its encoder's dense weights, the MLM
    head's transform as modules_to_save, dropout off."""
    model = tiny("bert")
    g = torch.Generator().manual_seed(1)
    masks = {lang: {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()
                    if ".layer." in n and n.endswith("dense.weight")} for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=masks, modules_to_save=["cls.predictions.transform"])
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_subnetwork_trainer_trains_the_modules_to_save_whole(tmp_path):
    """convert's modules_to_save train whole beside the masked weights (they once kept their
    initial values and were exported as trained). One step over the whole data set is AdamW's
    first step on them: θ(1 − lr·wd) − lr·g/(|g| + eps), decayed where the Trainer decays
    (weights, not biases or LayerNorms), with g from one plain backward of a copy."""
    model = _bert_with_subnetworks_and_head()
    head = {n: p for n, p in model.named_parameters() if n.startswith("cls.predictions.transform.")}
    assert len(head) == 4 and all(p.requires_grad for p in head.values())
    ref = copy.deepcopy(model).train()
    data = _MixedData(n=16)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "labels", "language_ids")}
    ref(**batch).loss.backward()
    lr, wd, eps = 1e-2, 0.1, 1e-8
    expected = {}
    for n, p in ref.named_parameters():
        if n in head:
            decay = wd if n.endswith("dense.weight") else 0.0
            expected[n] = p.detach() * (1 - lr * decay) - lr * p.grad / (p.grad.abs() + eps)
    subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1, per_device_train_batch_size=16, weight_decay=wd,
                                                          adam_epsilon=eps),
                                  train_dataset=data).train()
    for n, p in head.items():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-6, msg=n)
    diff = hf.extract_diff(model)
    assert all(torch.equal(diff.absolute[n], p.detach()) for n, p in head.items())
    # A converted layer the user froze trains nothing (it once failed to build the optimizer).
    frozen = model.bert.encoder.layer[0].output.dense.weight
    frozen.requires_grad_(False)
    kept = frozen.detach().clone()
    subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1), train_dataset=data).train()
    assert torch.equal(frozen, kept)


def test_subnetwork_trainer_decays_what_its_get_decay_parameter_names_names(tmp_path):
    """A Trainer subclass says which parameters weight decay reaches by overriding
    get_decay_parameter_names (the Trainer's create_optimizer and LotteryTicketSparseFineTuner
    ask it); SubnetworkTrainer asked transformers' default rule instead, so an override that
    decays nothing still decayed every subnetwork weight and the head's dense.weight."""
    def run(trainer_cls, wd):
        model = _bert_with_subnetworks_and_head()
        trainer_cls(model=model, args=_args(tmp_path, 2, per_device_train_batch_size=16, weight_decay=wd),
                    train_dataset=_MixedData(n=16)).train()
        return dict(model.named_parameters())

    class NoDecay(subnetworks.SubnetworkTrainer):
        def get_decay_parameter_names(self, model):
            return []

    got, want = run(NoDecay, 0.5), run(subnetworks.SubnetworkTrainer, 0.0)
    for n, p in want.items():
        assert torch.equal(got[n], p), n


@pytest.mark.slow  # torch.compile: ~7 s
def test_a_second_subnetwork_trainer_on_a_compiled_model_trains_it_compiled(tmp_path):
    # torch.compile's wrapper left accelerate's "prepared" mark on the bare model: the next
    # trainer's prepare returned it bare, and that run trained uncompiled
    seen = []

    class Recording(subnetworks.SubnetworkTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if torch.is_grad_enabled():  # not settle_loss_kwargs' no-grad probe of the bare model
                seen.append(type(model).__name__)
            return super().compute_loss(model, inputs, *args, **kwargs)

    model, _ = _structured_model("bert")
    for _ in range(2):
        Recording(model=model, args=_args(tmp_path, 1, torch_compile=True, torch_compile_backend="eager"),
                  train_dataset=_MixedData()).train()
    assert seen == ["OptimizedModule", "OptimizedModule"]


_DDP_MASKS_SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_subnetworks import _MixedData, _args, _structured_model
from xlsparse.hf import subnetworks
rank = int(os.environ["RANK"])
outcome = []
for seed in (1 + rank, 1):  # masks picked from each process's own scores, then from one seed
    model, _ = _structured_model("bert", seed=seed)
    try:
        subnetworks.SubnetworkTrainer(model=model, args=_args({out!r}, 1), train_dataset=_MixedData())
        outcome.append("")
    except ValueError as exc:
        outcome.append(str(exc))
gathered = [None, None]
torch.distributed.all_gather_object(gathered, outcome)
if rank == 0:
    torch.save(gathered, {out!r} + "/outcomes.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
'''


@pytest.mark.slow  # 2 processes: ~10 s each
def test_subnetwork_trainer_under_ddp_refuses_masks_that_differ_between_processes(tmp_path):
    # DDP averaged gradients masked by each process's own masks and each process's optimizer stepped
    # its own union: the replicas drifted apart silently
    from conftest import torchrun

    torchrun(_DDP_MASKS_SCRIPT, tmp_path, 29661, tests=os.path.dirname(os.path.abspath(__file__)))
    for own, shared in torch.load(tmp_path / "outcomes.pt", weights_only=False):
        assert "masks differ between the processes" in own and "all_reduce_scores" in own, own
        assert shared == ""

def test_dynamic_masks_callback_reselects_and_the_optimizer_follows(tmp_path):
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("llama")
    probe = {"de": _lm_batches(2, 11), "fr": _lm_batches(2, 12)}
    callback = subnetworks.DynamicMasksCallback(probe, every=2, heads_density=0.5, neurons_density=0.25)
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 4), train_dataset=_MixedData(),
                                            callbacks=[callback])
    trainer.train()
    assert callback.reselections == 2 and callback.scores == {}
    optimizer = subnetworks._unwrap(trainer.optimizer)
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    _, blocks = subnetworks.block_layout(model)
    for i in range(2):  # whole heads at the density asked, over the layers together
        cols = [layers[b["o"]].masks[i].all(0).reshape(2, -1) for b in blocks]
        assert all(torch.equal(c.all(1), c.any(1)) for c in cols)
        assert sum(int(c.all(1).sum()) for c in cols) == 2
    assert any(not torch.equal(layers[n[: -len(".weight")]].masks[0], m) for n, m in masks["de"].items())
    for layer in layers.values():
        union = layer.masks.any(0)
        state = optimizer.state[layer.weight]
        selected = state["mask"] if "mask" in state else torch.zeros(union.numel(), dtype=torch.bool).index_fill_(
            0, state["indices"].long(), True).view_as(union)
        assert torch.equal(selected, union)


def test_structured_importance_of_a_converted_model_in_training_is_the_whole_network_s():
    # It raised "no routing" on a converted model in training mode, where importance_scores works.
    model = tiny("bert")
    batch = _lm_batches(1, 4, b=2)[0]
    model.train()
    torch.manual_seed(0)  # the same dropout draws in both runs
    want = subnetworks.structured_importance(model, [batch])
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    masks = {lang: {n: torch.rand(model.get_parameter(n).shape, generator=torch.Generator().manual_seed(i)) < 0.1
                    for n in names} for i, lang in enumerate(["de", "fr"])}
    hf.convert(model, kind="subnetwork", masks=masks)
    model.train()
    torch.manual_seed(0)
    got = subnetworks.structured_importance(model, [batch])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_head_importance_is_the_gate_gradient_of_michel_et_al(arch):
    """I_h = Σ_examples |∂ℓ_i/∂ξ_h| for a gate ξ multiplying head h's output, ℓ_i the loss of
    example i alone, restated with explicit gates on the O projection's input (and on the FFN-out
    input). The same examples batched otherwise (3 + 1, whose mean losses weight them 1/3 and 1)
    give the same scores."""
    model = tiny(arch)
    _, layers = subnetworks.block_layout(model)
    modules = dict(model.named_modules())
    batch = _lm_batches(1, 4, b=4)[0]
    heads, neurons = subnetworks.structured_importance(model, [batch])
    want = {}
    for i in range(4):
        gates, hooks = {}, []
        for j, layer in enumerate(layers):
            for key, name, groups in (("o", layer["o"], 2), ("ffn", layer["ffn_out"], None)):
                width = modules[name].in_features
                gate = torch.ones(1, groups or width, requires_grad=True)
                gates[key, j] = gate

                def hook(module, args, gate=gate, groups=groups, width=width):
                    g = gate.repeat_interleave(width // groups, 1) if groups else gate
                    return (args[0] * g[:, None, :],)
                hooks.append(modules[name].register_forward_pre_hook(hook))
        model(**{k: v[i: i + 1] for k, v in batch.items()}).loss.backward()
        for h in hooks:
            h.remove()
        for key, gate in gates.items():
            want[key] = want.get(key, 0) + gate.grad.abs().sum(0)
    for j in range(len(layers)):
        torch.testing.assert_close(heads[j], want["o", j], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(neurons[j], want["ffn", j], rtol=1e-4, atol=1e-7)
    split = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    heads2, neurons2 = subnetworks.structured_importance(model, split)
    torch.testing.assert_close(heads2, heads, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(neurons2, neurons, rtol=1e-5, atol=1e-9)


def test_fomaml_one_language_per_step_needs_its_own_outer_optimizer():
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:3]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    joint = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    with pytest.raises(ValueError, match="outside the subnetworks"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)[0]}, masks, 0.1, 1, joint)
    per_language = {lang: subnetworks.fomaml_optimizer(model, {lang: masks[lang]}, lr=1e-2) for lang in masks}
    before = {n: named[n].detach().clone() for n in names}
    for _ in range(2):  # German steps never move entries outside the German subnetwork
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)[0]}, masks, 0.1, 1,
                                per_language["de"])
        for n in names:
            outside = ~masks["de"][n]
            assert torch.equal(named[n][outside], before[n][outside])


def test_dynamic_per_entry_reselection_picks_the_most_important_entries_outside_the_old_masks():
    """Re-selection ranks every entry by |∂L/∂W · W| of the probe batch, restated on a plain
    copy: the new mask is its top 10% over the converted weights, wherever the old mask was."""
    from types import SimpleNamespace

    from xlsparse.nn import SubnetworkLinear

    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.1 for n in names} for lang in ("de", "fr")}
    plain = copy.deepcopy(model)
    hf.convert(model, kind="subnetwork", masks=masks)
    probe = {"de": _lm_batches(1, 11, b=1), "fr": _lm_batches(1, 12, b=1)}
    callback = subnetworks.DynamicMasksCallback(probe, every=1, density=0.1)
    callback.on_step_end(None, SimpleNamespace(global_step=1), None, model=model, optimizer=None)
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    plain_named = dict(plain.named_parameters())
    for i, lang in enumerate(("de", "fr")):
        plain.zero_grad()
        plain(**probe[lang][0]).loss.backward()
        score = torch.cat([(plain_named[n].grad * plain_named[n]).abs().reshape(-1) for n in names])
        k = round(0.1 * score.numel())
        want = torch.zeros(score.numel(), dtype=torch.bool)
        want[score.topk(k).indices] = True
        got = torch.cat([layers[n[: -len(".weight")]].masks[i].reshape(-1) for n in names])
        old = torch.cat([masks[lang][n].reshape(-1) for n in names])
        assert torch.equal(got, want)
        assert int((got & ~old).sum()) > k // 2  # most of the new subnetwork lies outside the old one


def test_dynamic_masks_callback_per_entry_mode(tmp_path):
    from xlsparse.nn import SubnetworkLinear

    model, _ = _structured_model("gpt2")
    probe = {"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}
    callback = subnetworks.DynamicMasksCallback(probe, every=2, density=0.1)
    subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                  callbacks=[callback]).train()
    assert callback.reselections == 1
    layers = [layer for _, layer in hf.model._converted(model, SubnetworkLinear)]
    total = sum(layer.weight.numel() for layer in layers)
    for i in range(2):
        assert sum(int(layer.masks[i].sum()) for layer in layers) == round(0.1 * total)
    with pytest.raises(ValueError, match="heads_density"):
        subnetworks.DynamicMasksCallback(probe, every=2)


def test_set_masks_checks_every_shape_before_changing_a_layer():
    """GPT-2 masks are in the Conv1D layout [in, out]; a layer the masks do not name gets empty masks."""
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("gpt2")
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    before = {n: layer.masks.clone() for n, layer in layers.items()}
    first, last = list(masks["de"])[0], list(masks["de"])[-1]
    bad = {lang: dict(m) for lang, m in masks.items()}
    bad["fr"][last] = bad["fr"][last].t()
    with pytest.raises(ValueError, match=r"masks\['fr'\]\['.*c_proj.weight'\] must be a bool tensor of shape"):
        subnetworks.set_masks(model, bad)
    assert all(torch.equal(layer.masks, before[n]) for n, layer in layers.items())
    subnetworks.set_masks(model, {lang: {first: masks[lang][first]} for lang in masks})
    for n, layer in layers.items():
        want = torch.stack([masks[lang][first].t() for lang in masks]) if f"{n}.weight" == first else 0 * before[n]
        assert torch.equal(layer.masks, want), n


def test_set_masks_names_masks_of_the_wrong_form_before_changing_a_layer():
    """A list where a language's {name: mask} goes failed on `.get` (AttributeError), one tensor's
    rows were read as parameter names, and a mask given as a list failed on `.dtype`."""
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("bert")
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    before = {n: layer.masks.clone() for n, layer in layers.items()}
    with pytest.raises(TypeError, match=r"set_masks: masks must map each language to its masks"):
        subnetworks.set_masks(model, list(masks.values()))
    for form in (list(masks["fr"].items()), next(iter(masks["fr"].values()))):
        with pytest.raises(TypeError, match=r"set_masks: masks\['fr'\] must be \{parameter name: bool tensor\}, got a "
                                            rf"{type(form).__name__}"):
            subnetworks.set_masks(model, {"de": masks["de"], "fr": form})
    first = next(iter(masks["fr"]))
    with pytest.raises(ValueError, match=rf"masks\['fr'\]\['{re.escape(first)}'\] must be a bool tensor .* got list"):
        subnetworks.set_masks(model, {"de": masks["de"], "fr": {**masks["fr"], first: masks["fr"][first].tolist()}})
    assert all(torch.equal(layer.masks, before[n]) for n, layer in layers.items())


def test_set_masks_refuses_a_plain_optimizer_before_changing_a_layer():
    # a torch AdamW raised AttributeError (no update_masks) after every layer had the new masks:
    # the model then routed the new supports while the optimizer still stepped the old ones
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("gpt2")
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    before = {n: (layer.masks.clone(), layer.weight.detach().clone()) for n, layer in layers.items()}
    grown = {lang: {n: ~m for n, m in lang_masks.items()} for lang, lang_masks in masks.items()}
    with pytest.raises(TypeError, match="set_masks: optimizer must be an xlsparse masked optimizer.*got AdamW"):
        subnetworks.set_masks(model, grown, optimizer=torch.optim.AdamW(model.parameters()))
    for n, layer in layers.items():
        assert torch.equal(layer.masks, before[n][0]) and torch.equal(layer.weight, before[n][1]), n


@pytest.mark.parametrize("name", ["module.{}", "{}x", "transformer.wte.weight", "{}bias"])
def test_set_masks_refuses_names_no_converted_layer_reads(name):
    """A name that matches no converted weight (a prefix, a typo, a parameter that is not routed)
    was dropped: every layer got an empty mask and training silently stopped."""
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("gpt2")
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    before = {n: layer.masks.clone() for n, layer in layers.items()}
    named = dict(model.named_parameters())
    first = list(masks["de"])[0]
    key = name.format(first[: -len("weight")] if name.endswith("bias") else first)
    value = {lang: (torch.ones(named[key].shape, dtype=torch.bool) if key in named else masks[lang][first])
             for lang in masks}
    with pytest.raises(ValueError, match="not weights of the model's SubnetworkLinear layers"):
        subnetworks.set_masks(model, {lang: {key: value[lang]} for lang in masks})
    assert all(torch.equal(layer.masks, before[n]) for n, layer in layers.items())


def test_dynamic_structured_reselection_on_a_partly_converted_model():
    """Structured re-selection scores every block; only the converted layers take masks."""
    from types import SimpleNamespace

    from xlsparse.nn import SubnetworkLinear

    model = tiny("llama")
    heads, neurons = subnetworks.structured_importance(model, _lm_batches(1, 1))
    full = subnetworks.structured_masks(model, heads, neurons, 0.5, 0.5)
    attention = {n: m for n, m in full.items() if ".self_attn." in n}
    hf.convert(model, [n[: -len(".weight")] for n in attention], kind="subnetwork",
               masks={"de": attention, "fr": attention})
    callback = subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}, every=1,
                                                heads_density=0.5, neurons_density=0.5)
    callback.on_step_end(None, SimpleNamespace(global_step=1), None, model=model, optimizer=None)
    assert callback.reselections == 1
    assert all(bool(layer.masks.any()) for _, layer in hf.model._converted(model, SubnetworkLinear))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_structured_importance_of_a_model_converted_in_its_ffn_only_is_the_whole_network_s(arch):
    """Michel et al.'s gate gradient ∂ℓ/∂ξ = Σ_t o_t·∂ℓ/∂o_t needs no parameter before the gate to
    train: on a model converted in its FFN only (everything else frozen), the first layer's head
    inputs need no gradient, and scoring raised "no gradient reached a head/neuron input" (a
    DynamicMasksCallback after its first training step). The scores equal the unconverted model's."""
    from types import SimpleNamespace

    model = tiny(arch)
    heads, neurons = subnetworks.structured_importance(model, _lm_batches(1, 1))
    full = subnetworks.structured_masks(model, heads, neurons, 0.5, 0.5)
    _, layers = subnetworks.block_layout(model)
    ffn = {n for layer in layers for part in ("ffn_in", "ffn_out")
           for n in (layer[part] if isinstance(layer[part], tuple) else (layer[part],))}
    masks = {n: m for n, m in full.items() if n[: -len(".weight")] in ffn}
    hf.convert(model, [n[: -len(".weight")] for n in masks], kind="subnetwork", masks={"de": masks, "fr": masks})
    got_heads, got_neurons = subnetworks.structured_importance(model, _lm_batches(1, 1))
    torch.testing.assert_close(got_heads, heads, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_neurons, neurons, rtol=1e-5, atol=1e-7)
    callback = subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}, every=1,
                                                heads_density=0.5, neurons_density=0.5)
    callback.on_step_end(None, SimpleNamespace(global_step=1), None, model=model, optimizer=None)
    assert callback.reselections == 1


def _assert_diff_is_the_change_since_convert(model, arch):
    """The exported diff restated: trained minus base weights, every entry (zeros included)."""
    from xlsparse.nn import SubnetworkLinear

    base = dict(tiny(arch).named_parameters())
    transposed = {f"{n}.weight" for n, layer in hf.model._converted(model, SubnetworkLinear) if layer.transposed}
    diff = hf.extract_diff(model)
    changed = 0
    for n, p in model.named_parameters():
        want = (p.detach().t() if n in transposed else p.detach()) - base[n].detach()  # GPT-2's Conv1D layout
        changed += int((want != 0).sum())
        got = diff.deltas[n].to_dense() if n in diff.deltas else torch.zeros_like(want)
        assert torch.equal(got, want), n
    assert changed > 0


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_diff_after_reselection_covers_every_entry_ever_trained_and_disable_gives_the_base(arch):
    from xlsparse.nn import SubnetworkLinear
    from xlsparse.optim import MaskedAdamW

    model, masks = _structured_model(arch)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 8), generator=g)
    layers = [layer for _, layer in hf.model._converted(model, SubnetworkLinear)]
    optimizer = MaskedAdamW([layer.weight for layer in layers], [layer.trainable_mask() for layer in layers], lr=1e-2)

    def train():
        with hf.route(model, torch.tensor([0, 1])):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train()
    flipped = {lang: {n: ~m for n, m in named.items()} for lang, named in masks.items()}  # every entry new
    subnetworks.set_masks(model, flipped, optimizer)
    train()
    _assert_diff_is_the_change_since_convert(model, arch)
    with hf.disable(model), torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny(arch)(input_ids=ids).logits, rtol=0, atol=0)


def test_reselection_and_disable_refuse_a_weight_changed_outside_its_subnetworks():
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("bert")
    name, layer = next(iter(hf.model._converted(model, SubnetworkLinear)))
    before = {n: layer.masks.clone() for n, layer in hf.model._converted(model, SubnetworkLinear)}
    with torch.no_grad():
        layer.weight[~layer.trainable_mask()] += 1.0  # e.g. a plain optimizer's weight decay
    flipped = {lang: {n: ~m for n, m in named.items()} for lang, named in masks.items()}
    with pytest.raises(ValueError, match=rf"set_masks: {name}\.weight changed outside its subnetworks"):
        subnetworks.set_masks(model, flipped)
    assert all(torch.equal(layer.masks, before[n]) for n, layer in hf.model._converted(model, SubnetworkLinear))
    with pytest.raises(ValueError, match=rf"disable: {name}\.weight changed outside"), hf.disable(model):
        pass  # the base model is not known there any more


def test_route_refuses_a_layer_given_its_masks_in_another_order():
    """SubnetworkLinear.set_masks with the model's languages in another order made id 0 'fr' in that
    layer while the model's id 0 stayed 'de': a batch routed to 'de' trained fr's mask there, silently."""
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("bert")
    name, layer = next(iter(hf.model._converted(model, SubnetworkLinear)))
    key = f"{name}.weight"
    layer.set_masks({"fr": masks["fr"][key], "de": masks["de"][key]})
    model.train()
    with pytest.raises(ValueError, match=rf"'{name}' holds the languages \['fr', 'de'\] in id order, the model's "
                                         r"are \['de', 'fr'\]"):
        with hf.route(model, ["de"] * 4):
            pass
    subnetworks.set_masks(model, masks)  # the model's order again
    with hf.route(model, ["de"] * 4):
        model(**_lm_batches(1, 3)[0]).loss.backward()
    trained = layer.weight.grad != 0
    assert bool(trained.any()) and not bool(trained[~masks["de"][key]].any())


def test_set_masks_on_layers_built_by_hand():
    # no convert, so no diff to cover: re-selection and a trainer checkpoint need no record
    from xlsparse.nn import SubnetworkLinear

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    g = torch.Generator().manual_seed(0)
    model[0] = SubnetworkLinear.from_linear(model[0], {lang: torch.rand(3, 4, generator=g) < 0.5 for lang in "ab"})
    new = {lang: {"0.weight": torch.rand(3, 4, generator=g) < 0.5} for lang in "ab"}
    subnetworks.set_masks(model, new)
    assert torch.equal(model[0].masks, torch.stack([new[lang]["0.weight"] for lang in "ab"]))
    assert hf.model._subnet_coverage(model) == {}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_dynamic_masks_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, arch):
    """The checkpoint at step 3 lies after one re-selection and inside the next scoring window: the
    resumed run needs the re-selected layer masks and the callback's scores and count."""
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear

    def run(out, resume=None):
        model, _ = _structured_model(arch)
        probe = {"de": _lm_batches(2, 11), "fr": _lm_batches(2, 12)}
        callback = subnetworks.DynamicMasksCallback(probe, every=2, heads_density=0.5, neurons_density=0.25)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=5,
                                 save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=1000, lr_scheduler_type="constant", max_grad_norm=0.0)
        subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData(n=20),
                                      callbacks=[callback]).train(resume_from_checkpoint=resume)
        masks = {n: layer.masks for n, layer in hf.model._converted(model, SubnetworkLinear)}
        _assert_diff_is_the_change_since_convert(model, arch)  # the re-selections' entries too, resumed or not
        return dict(model.named_parameters()), masks, callback

    weights, masks, callback = run(tmp_path / "a")
    resumed_weights, resumed_masks, resumed_callback = run(tmp_path / "b", resume=tmp_path / "a" / "checkpoint-3")
    assert callback.reselections == resumed_callback.reselections == 2
    for n, m in masks.items():
        assert torch.equal(resumed_masks[n], m), n
    for n, p in weights.items():
        torch.testing.assert_close(resumed_weights[n], p, rtol=0, atol=0, msg=n)


def test_dynamic_masks_callback_refuses_a_state_of_the_other_kind_of_scores():
    """A state of head/neuron scores loaded into a per-entry callback (or the reverse) was taken,
    and the first step after the resume failed adding the two kinds with a bare TypeError."""
    probe = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    structured = {"scores": {"de": (torch.rand(2, 2), torch.rand(2, 48))}, "reselections": 1}
    entries = {"scores": {"de": {"w": torch.rand(3)}}, "reselections": 1}
    per_entry = subnetworks.DynamicMasksCallback(probe, every=1, density=0.1)
    with pytest.raises(ValueError, match=r"saved scores of \['de'\] are head/neuron scores, this callback selects entries"):
        per_entry.load_state_dict(structured)
    heads = subnetworks.DynamicMasksCallback(probe, every=1, heads_density=0.5, neurons_density=0.5)
    with pytest.raises(ValueError, match=r"saved scores of \['de'\] are per-entry scores"):
        heads.load_state_dict(entries)
    assert per_entry.scores == {} and heads.scores == {}
    per_entry.load_state_dict(entries)
    heads.load_state_dict(structured)
    assert per_entry.scores["de"] is entries["scores"]["de"] and heads.reselections == 1


@pytest.mark.parametrize("changed", [{"every": 3}, {"neurons_density": 0.5}, {"heads_density": 0.25}])
def test_dynamic_masks_callback_refuses_a_state_saved_with_other_settings(changed):
    """A resume with another `every` or density was taken: the resumed steps re-selected on
    another schedule, or kept another share of heads/neurons, than the run that wrote the
    checkpoint, silently. The saved state now carries the settings; a state of one saved before
    them (no settings) is still taken."""
    probe = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    made = dict(every=2, heads_density=0.5, neurons_density=0.25)
    saving = subnetworks.DynamicMasksCallback(probe, **made)
    saving.scores, saving.reselections = {"de": (torch.rand(2, 2), torch.rand(2, 48))}, 1
    state = saving.state_dict()
    other = subnetworks.DynamicMasksCallback(probe, **{**made, **changed})
    (key, value), = changed.items()
    with pytest.raises(ValueError, match=rf"re-selected with {key} = {made[key]} \(this callback: {value}\)"):
        other.load_state_dict(state)
    assert other.scores == {} and other.reselections == 0
    same = subnetworks.DynamicMasksCallback(probe, **made)
    same.load_state_dict(state)
    assert same.reselections == 1
    other.load_state_dict({"scores": state["scores"], "reselections": 1})


def test_load_best_model_at_end_brings_back_the_best_checkpoint_s_masks_and_coverage(tmp_path):
    """The Trainer's own _load_best_model loaded the best checkpoint's weights only: the model kept
    the masks and coverage of the last re-selection, so it routed, and exported its diff, as no
    checkpoint of the run had. It must equal the best checkpoint resumed on its own."""
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear

    def run(out, resume=None):
        model, _ = _structured_model("bert")
        probe = {"de": _lm_batches(2, 11), "fr": _lm_batches(2, 12)}
        callback = subnetworks.DynamicMasksCallback(probe, every=2, heads_density=0.5, neurons_density=0.25)
        # greater_is_better on the loss: the first checkpoint is the best, two re-selections before the end
        best = {"save_strategy": "steps", "save_steps": 2, "eval_strategy": "steps", "eval_steps": 2,
                "load_best_model_at_end": True, "metric_for_best_model": "loss", "greater_is_better": True}
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                                 max_steps=6, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                                 lr_scheduler_type="constant", max_grad_norm=0.0,
                                 **(best if resume is None else {"save_strategy": "no"}))
        trainer = subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData(n=24),
                                                eval_dataset=_MixedData(n=8, seed=3), callbacks=[callback])
        if resume is None:
            trainer.train()
        else:  # what resume_from_checkpoint loads, without the step the Trainer then takes
            trainer._load_from_checkpoint(resume)
        return model, trainer.state.best_model_checkpoint

    model, best = run(tmp_path / "a")
    assert best == str(tmp_path / "a" / "checkpoint-2")
    alone, _ = run(tmp_path / "b", resume=best)
    saved = [torch.load(os.path.join(tmp_path / "a" / c, "subnetwork_masks.pt"))["masks"]
             for c in ("checkpoint-2", "checkpoint-6")]
    assert any(not torch.equal(saved[0][n], m) for n, m in saved[1].items())  # re-selected since the best
    layers = dict(hf.model._converted(model, SubnetworkLinear))
    for n, layer in hf.model._converted(alone, SubnetworkLinear):
        assert torch.equal(layers[n].masks, layer.masks), n
    cover, want = hf.model._subnet_coverage(model), hf.model._subnet_coverage(alone)
    assert all(torch.equal(cover[n][0], want[n][0]) for n in want)
    got, expect = hf.extract_diff(model), hf.extract_diff(alone)
    assert got.deltas.keys() == expect.deltas.keys()
    for n, d in expect.deltas.items():
        assert torch.equal(got.deltas[n].indices, d.indices) and torch.equal(got.deltas[n].values, d.values), n
    ids = _MixedData(n=4, seed=5)
    with torch.no_grad(), hf.route(model, ids.lang), hf.route(alone, ids.lang):
        torch.testing.assert_close(model(input_ids=ids.ids).logits, alone(input_ids=ids.ids).logits, rtol=0, atol=0)


def test_after_load_best_model_at_end_the_optimizer_steps_by_the_best_checkpoint_s_masks(tmp_path):
    """The layers got the best checkpoint's masks back, the optimizer kept the last re-selection's:
    a second train() of the trainer decayed entries outside every language's mask (and its
    re-selection then raised on them)."""
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear

    model, _ = _structured_model("bert")
    probe = {"de": _lm_batches(2, 11), "fr": _lm_batches(2, 12)}
    callback = subnetworks.DynamicMasksCallback(probe, every=1, density=0.2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                             save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                             load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.1)
    trainer = subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData(n=16),
                                            eval_dataset=_MixedData(n=8, seed=3), callbacks=[callback])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    layers = [layer for _, layer in hf.model._converted(model, SubnetworkLinear)]
    before = [(layer.weight.detach().clone(), ~layer.trainable_mask()) for layer in layers]
    args.max_steps, args.eval_strategy, args.save_strategy, args.load_best_model_at_end = 1, "no", "no", False
    trainer.train()  # one step, then a re-selection
    for layer, (w, outside) in zip(layers, before):
        assert torch.equal(layer.weight.detach()[outside], w[outside])
    hf.extract_diff(model)  # raised: weights changed outside the diff


def test_a_resumed_run_keeps_the_per_language_bias_masks_it_was_trained_with(tmp_path):
    """subnetwork_masks.pt held no bias masks: a run resumed on a model rebuilt by convert (which
    makes none) trained each converted bias as one shared by every language (0.0115 apart)."""
    from transformers import TrainingArguments

    from xlsparse.nn import SubnetworkLinear

    def run(out, bias_masks, resume=None):
        model = tiny("bert")
        g = torch.Generator().manual_seed(1)
        masks = {lang: {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()
                        if ".layer." in n and n.endswith("dense.weight")} for lang in ("de", "fr")}
        hf.convert(model, kind="subnetwork", masks=masks)
        for _, layer in hf.model._converted(model, SubnetworkLinear):
            layer.bias.requires_grad_(True)
            if bias_masks:
                layer.set_masks(dict(zip(layer.languages, layer.masks.unbind(0))),
                                {lang: torch.rand(layer.out_features, generator=g) < 0.5 for lang in layer.languages})
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                                 save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=1000, lr_scheduler_type="constant", max_grad_norm=0.0)
        subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData(n=16)).train(
            resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "a", bias_masks=True)
    resumed = run(tmp_path / "b", bias_masks=False, resume=tmp_path / "a" / "checkpoint-2")
    for (n, layer), (_, other) in zip(hf.model._converted(whole, SubnetworkLinear),
                                      hf.model._converted(resumed, SubnetworkLinear)):
        assert torch.equal(other.bias_masks, layer.bias_masks), n
    resumed_params = dict(resumed.named_parameters())
    for n, p in whole.named_parameters():
        torch.testing.assert_close(resumed_params[n], p, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("steps, saved, said", [
    # it holds no optimizer, scheduler or RNG state: the resumed run restarted AdamW's moments
    # silently and ended 0.039 away from the uninterrupted one after 2 more steps
    (4, dict(save_only_model=True), "checkpoint-2 holds no optimizer.pt .*save_only_model"),
    # the Trainer checks max_steps only after a step: within an epoch the finished run took a third
    # step of 2, saved as checkpoint-3 and left as the model, silently
    (2, {}, "checkpoint-2 is at step 2 and TrainingArguments.max_steps = 2"),
], ids=["save_only_model", "last_step"])
def test_a_checkpoint_that_cannot_continue_its_run_is_refused_before_anything_changes(tmp_path, steps, saved, said):
    model, _ = _structured_model("bert")
    subnetworks.SubnetworkTrainer(model=model, train_dataset=_MixedData(n=24),
                                  args=_args(tmp_path / "a", steps, save_strategy="steps", save_steps=2,
                                             **saved)).train()
    model, _ = _structured_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path / "b", steps),
                                            train_dataset=_MixedData(n=24))
    with pytest.raises(ValueError, match=said):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_a_refused_resume_leaves_the_model_as_it_was(tmp_path):
    """A checkpoint of a model whose languages are listed in another order is refused; the
    Trainer once loaded its weights first, so the model kept the trained weights under its own
    (swapped) masks after the error."""
    from transformers import TrainingArguments

    def model_and_args(order, out, **kw):
        model = tiny("bert")
        g = torch.Generator().manual_seed(1)
        masks = {lang: {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in model.named_parameters()
                        if ".layer." in n and n.endswith("dense.weight")} for lang in ("de", "fr")}
        hf.convert(model, kind="subnetwork", masks={lang: masks[lang] for lang in order})
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2,
                                 report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000, **kw)
        return model, args

    model, args = model_and_args(("de", "fr"), tmp_path / "a", save_strategy="steps", save_steps=2)
    subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData(n=8)).train()
    swapped, args = model_and_args(("fr", "de"), tmp_path / "b", save_strategy="no")
    args.max_steps = 4  # steps left to train after the checkpoint
    before = {n: p.detach().clone() for n, p in swapped.named_parameters()}
    trainer = subnetworks.SubnetworkTrainer(model=swapped, args=args, train_dataset=_MixedData(n=8))
    with pytest.raises(ValueError, match="another setup"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for n, p in swapped.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("other", ["another seed", "outside the masks", "on a masked entry"])
def test_resuming_on_another_base_model_is_refused_before_anything_changes(tmp_path, arch, other):
    """The checkpoint's weights and coverage (its values from convert) replaced the other base's: the
    run trained on, and its diff was taken against the checkpoint's base. With one entry of a
    converted weight changed, off the masks or on them, nothing raised, not even extract_diff.
    (GPT-2: a converted Conv1D's checkpoint holds its [in, out] layout; c_proj is square.)"""
    name = {"bert": "bert.encoder.layer.0.attention.output.dense.weight", "gpt2": "transformer.h.0.attn.c_proj.weight"}[arch]

    def converted(model, change=None):
        named = dict(model.named_parameters())
        g = torch.Generator().manual_seed(1)
        masks = {lang: {f"{n}.weight": torch.rand(named[f"{n}.weight"].shape, generator=g) < 0.3
                        for n in hf.model.target_names(model)} for lang in ("de", "fr")}
        union = masks["de"][name] | masks["fr"][name]
        if change is not None:  # one entry of the base, as a model fine-tuned elsewhere would differ
            with torch.no_grad():
                named[name][(union if change == "on a masked entry" else ~union).nonzero()[0].tolist()] += 1
        hf.convert(model, kind="subnetwork", masks=masks)
        return model

    subnetworks.SubnetworkTrainer(model=converted(tiny(arch)), train_dataset=_MixedData(n=8),
                                  args=_args(tmp_path / "a", 2, save_strategy="steps", save_steps=1)).train()
    model = converted(tiny(arch, seed=1)) if other == "another seed" else converted(tiny(arch), change=other)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path / "b", 2), train_dataset=_MixedData(n=8))
    with pytest.raises(ValueError, match="checkpoint-1 was trained from another base model"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _converted_at_random(arch: str):
    """A tiny model converted to subnetworks of de and fr, each a random 30% of every target
    weight; its masks, and the generator that drew them (to draw more)."""
    model = tiny(arch)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    layer_masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=layer_masks)
    return model, layer_masks, g


@pytest.mark.parametrize("recipe", ["reptile", "fomaml"])
def test_meta_learning_refuses_bias_masks_a_layer_s_per_language_bias_masks_close(recipe):
    """A SubnetworkLinear with per-language bias_masks masks each language's bias gradient by them:
    recipe masks opening other bias entries left those untrained without an error (as for weights)."""
    from xlsparse.nn import SubnetworkLinear

    model, layer_masks, g = _converted_at_random("bert")
    name, layer = next(iter(hf.model._converted(model, SubnetworkLinear)))
    bias_masks = {lang: torch.rand(layer.out_features, generator=g) < 0.5 for lang in ("de", "fr")}
    layer.set_masks(dict(zip(layer.languages, layer.masks.unbind(0))), bias_masks)
    layer.bias.requires_grad_(True)
    bias = f"{name}.bias"

    def run(bias_open):
        masks = {lang: {**layer_masks[lang], bias: bias_open[lang]} for lang in ("de", "fr")}
        if recipe == "reptile":
            return subnetworks.reptile_step(model, {"de": _lm_batches(1, 0), "fr": _lm_batches(1, 1)}, masks,
                                            inner_lr=0.1)
        opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-3)
        return subnetworks.fomaml_step(model, {"de": _lm_batches(1, 0)[0], "fr": _lm_batches(1, 1)[0]},
                                       {"de": _lm_batches(1, 10)[0], "fr": _lm_batches(1, 11)[0]}, masks,
                                       inner_lr=0.1, inner_steps=1, outer_optimizer=opt)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=rf"masks\['de'\]\['{re.escape(bias)}'\] opens \d+ entries that the converted "
                                         "layer's own mask for 'de' closes"):
        run({"de": torch.ones(layer.out_features, dtype=torch.bool), "fr": bias_masks["fr"]})
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    run(bias_masks)  # the layer's own bias masks: the opened entries train, the others stay
    union = bias_masks["de"] | bias_masks["fr"]
    assert torch.equal(layer.bias[~union], before[bias][~union])
    assert bool((layer.bias[union] != before[bias][union]).any())


@pytest.mark.parametrize("recipe", ["reptile", "fomaml"])
def test_meta_learning_refuses_masks_the_converted_layers_close(recipe):
    """A converted layer masks each language's gradient by its own mask: recipe masks opening
    other entries left them untrained without an error (Reptile changed nothing at all)."""
    model, layer_masks, g = _converted_at_random("gpt2")
    other = {lang: {n: ~m for n, m in ms.items()} for lang, ms in layer_masks.items()}
    subset = {lang: {n: m & (torch.rand(m.shape, generator=g) < 0.5) for n, m in ms.items()}
              for lang, ms in layer_masks.items()}

    def run(masks, langs=("de", "fr")):
        if recipe == "reptile":
            return subnetworks.reptile_step(model, {lang: _lm_batches(1, i) for i, lang in enumerate(langs)}, masks,
                                            inner_lr=0.1)
        opt = subnetworks.fomaml_optimizer(model, {lang: masks[lang] for lang in langs}, lr=1e-3, weight_decay=0.0)
        return subnetworks.fomaml_step(model, {lang: _lm_batches(1, i)[0] for i, lang in enumerate(langs)},
                                       {lang: _lm_batches(1, 10 + i)[0] for i, lang in enumerate(langs)}, masks,
                                       inner_lr=0.1, inner_steps=1, outer_optimizer=opt)

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="converted layer's own mask for 'de' closes"):
        run(other)
    with pytest.raises(ValueError, match="converted for the languages"):
        run({**layer_masks, "ja": layer_masks["de"]}, ("de", "ja"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    run(subset)  # inside the layers' masks: fine
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed


def test_fomaml_refuses_an_outer_optimizer_that_misses_a_language_of_the_step():
    """An outer optimizer built for fewer languages than the step: the others' outer gradients were
    computed (their query losses returned) and silently dropped."""
    model = tiny("llama")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    owner = {n: torch.randint(0, 3, named[n].shape, generator=g) for n in names}
    masks = {lang: {n: owner[n] == i for n in names} for i, lang in enumerate(("de", "fr"))}
    support = {"de": _lm_batches(1, 1)[0], "fr": _lm_batches(1, 2)[0]}
    query = {"de": _lm_batches(1, 3)[0], "fr": _lm_batches(1, 4)[0]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    only_de = subnetworks.fomaml_optimizer(model, {"de": masks["de"]}, lr=1e-2, weight_decay=0.0)
    with pytest.raises(ValueError, match="does not update .* entries of"):
        subnetworks.fomaml_step(model, support, query, masks, 0.1, 1, only_de)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    subnetworks.fomaml_step(model, {"de": support["de"]}, {"de": query["de"]}, masks, 0.1, 1, only_de)  # its own step
    both = subnetworks.fomaml_optimizer(model, masks, lr=1e-2, weight_decay=0.0)
    subnetworks.fomaml_step(model, support, query, masks, 0.1, 1, both)
    for lang in masks:
        assert any(bool((named[n] != before[n])[masks[lang][n]].any()) for n in names), lang


@pytest.mark.parametrize("optim", ["sgd", "adafactor"])
def test_subnetwork_trainer_refuses_an_optim_it_would_replace_by_adamw(tmp_path, optim):
    """create_optimizer always builds MaskedAdamW: TrainingArguments.optim='sgd' once trained with
    AdamW's rule without a word. It raises, naming optim, and continual_trainer raises before it
    converts the model."""
    from xlsparse.hf import continual

    model, _ = _structured_model("bert")
    with pytest.raises(ValueError, match="optim = '" + optim):
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1, optim=optim), train_dataset=_MixedData())
    plain = tiny("bert")
    masks = {lang: {"bert.encoder.layer.0.output.dense.weight": torch.ones(32, 48, dtype=torch.bool)} for lang in ("de", "fr")}
    with pytest.raises(ValueError, match="optim = '" + optim):
        continual.continual_trainer(plain, masks, args=_args(tmp_path, 1, optim=optim), train_dataset=_MixedData())
    # The other options SubnetworkTrainer refuses: refused before the model is converted too (it
    # was left converted when SubnetworkTrainer, or the Trainer, raised)
    assert getattr(plain, "xlsparse_config", None) is None
    for option, value in (("optimizer_cls_and_kwargs", (torch.optim.SGD, {})), ("model_init", lambda: tiny("bert"))):
        plain = tiny("bert")
        with pytest.raises(ValueError, match=option):
            continual.continual_trainer(plain, masks, args=_args(tmp_path, 1), train_dataset=_MixedData(), **{option: value})
        assert getattr(plain, "xlsparse_config", None) is None, option


def test_importance_scores_refuse_a_parameter_that_does_not_require_grad():
    """A frozen parameter gets no gradient: its scores were silently all zeros (e.g. a layer that
    convert did not target), which select_masks ranked as real. It raises, naming it."""
    model = tiny("bert")
    body = [f"{n}.weight" for n in hf.model.target_names(model)]
    hf.convert(model, [n[: -len(".weight")] for n in body if ".attention." in n], kind="subnetwork", masks={"de": {}})
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight.*do not require grad"):
        subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, params=body, progress=False)
    trainable = [n for n in body if ".attention." in n]
    scores = subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, params=trainable, progress=False)
    assert all(float(scores["de"][n].sum()) > 0 for n in trainable)


def test_importance_scores_refuse_one_name_as_a_str():
    """params="x.weight" was read a character at a time: "the model has no parameters ['x', '.', ...]"."""
    model = tiny("bert")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(TypeError, match=r"^importance_scores: params must be a list .*pass \[name\]"):
        subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, params=name, progress=False)


def test_importance_scores_name_the_tensor_behind_a_tied_name():
    # a tied head's other name was "no parameters", as if misspelt
    model = tiny("bert")
    named = dict(model.named_parameters())
    alias = next(n for n, p in model.named_parameters(remove_duplicate=False) if n not in named)
    canonical = next(n for n, p in named.items() if p is model.get_submodule(alias.rsplit(".", 1)[0]).weight)
    with pytest.raises(ValueError, match=rf"no parameters \['{re.escape(alias)}'\] under those names \('{re.escape(alias)}' "
                                         rf"is '{re.escape(canonical)}'"):
        subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, params=[alias], progress=False)


def test_importance_scores_leave_the_gradients_cleared_when_a_backward_fails():
    # a backward that failed part way (out of memory, a hook) left the upper layers' gradients of
    # that example in .grad, for the caller's next optimizer step to add in
    model = tiny("bert")
    emb = model.bert.embeddings.word_embeddings.weight
    calls = []

    def loss_fn(m, b):
        calls.append(1)
        if len(calls) == 2:
            emb.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("backward failed")))
        return m(**b).loss

    with pytest.raises(RuntimeError, match="backward failed"):
        subnetworks.importance_scores(model, {"de": _lm_batches(1, 1)}, loss_fn=loss_fn, progress=False)
    assert len(calls) == 2
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
    # the meta-learning steps, which restore θ on a failure, restore its gradients (none) too
    body = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if ".encoder." in n}
    masks = {"de": body, "fr": body}
    data = {"de": _lm_batches(1, 1)[0], "fr": _lm_batches(1, 2)[0]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in (lambda: subnetworks.reptile_step(model, data, masks, loss_fn=loss_fn),
                 lambda: subnetworks.fomaml_step(model, data, data, masks, 1e-3, 1,
                                                 subnetworks.fomaml_optimizer(model, masks, lr=1e-3), loss_fn=loss_fn)):
        calls.clear()
        emb._backward_hooks.clear()
        with pytest.raises(RuntimeError, match="backward failed"):
            step()
        assert [n for n, p in model.named_parameters() if p.grad is not None] == []
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("mode", ["dense", "compact"])
def test_set_masks_keeps_the_optimizer_masks_of_the_other_parameters(mode):
    """set_masks re-masks the converted weights in the optimizer; a parameter it does not route (a
    saved head trained on a mask of its own) once came back as "every entry" and trained whole."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=masks, modules_to_save=["cls.predictions.transform.dense"])
    head = model.cls.predictions.transform.dense.weight
    head_mask = torch.rand(head.shape, generator=g) < 0.1
    opt = xlsparse.optim.MaskedAdamW([named[n] for n in names] + [head], [None] * len(names) + [head_mask], lr=1e-2,
                                     weight_decay=0.0, mode=mode)
    new = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    subnetworks.set_masks(model, new, opt)
    before = head.detach().clone()
    ids = _lm_batches(1, 1)[0]["input_ids"]
    model.train()
    with hf.route(model, [0, 1, 0, 1]):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.equal(head[~head_mask], before[~head_mask])
    assert bool((head[head_mask] != before[head_mask]).any())
    layer = model.get_submodule(names[0][: -len(".weight")])  # the converted weights follow the new union
    assert torch.equal(layer.trainable_mask(), new["de"][names[0]] | new["fr"][names[0]])


def test_fomaml_optimizer_defaults_to_udify_metalearnings_adam_without_weight_decay():
    """udify-metalearning's outer optimizer is torch.optim.Adam, no weight decay; fomaml_optimizer
    once kept AdamW's default 0.01, which decayed the subnetworks on every outer step."""
    model, twin, names, masks, support, query = _fomaml_setup(support_batches=1)
    named = dict(model.named_parameters())
    subnetworks.fomaml_step(model, support, query, masks, 0.1, 1, subnetworks.fomaml_optimizer(model, masks, lr=1e-2))
    expect = _plain_fomaml(twin, support, query, masks, inner_lr=0.1, inner_steps=1)
    twin_named = dict(twin.named_parameters())
    adam = torch.optim.Adam([twin_named[n] for n in names], lr=1e-2)
    for n in names:
        twin_named[n].grad = expect[n]
    adam.step()
    for n in names:
        union = masks["de"][n] | masks["fr"][n]
        torch.testing.assert_close(named[n][union], twin_named[n][union], rtol=0, atol=1e-6)


def test_fomaml_optimizer_weight_decay_skips_biases_and_norms_as_the_subnetwork_trainer_does():
    """With weight_decay given, the outer step decayed every parameter it held: the LayerNorm
    weights and the biases of convert's modules_to_save (and any bias or norm the masks name)
    lost lr·wd of their value per step, where SubnetworkTrainer and continual_update, and the
    Trainer's own AdamW, decay none of them. The first outer step on the head is AdamW's:
    θ(1 − lr·wd) − lr·g/(|g| + eps), decayed only where the Trainer decays (dense.weight)."""
    model = tiny("bert").eval()
    named = dict(model.named_parameters())
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=masks, modules_to_save=["cls.predictions.transform"])
    head = {n: p for n, p in model.named_parameters() if n.startswith("cls.predictions.transform.")}
    before = {n: p.detach().clone() for n, p in head.items()}
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = subnetworks.fomaml_optimizer(model, masks, lr=lr, weight_decay=wd, eps=eps)
    support = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    query = {"de": _lm_batches(1, 3)[0], "fr": _lm_batches(1, 4)[0]}
    subnetworks.fomaml_step(model, support, query, masks, 0.1, 1, opt)
    for n, p in head.items():
        decay = wd if n.endswith("dense.weight") else 0.0
        want = before[n] * (1 - lr * decay) - lr * p.grad / (p.grad.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-6, msg=n)


def test_a_language_s_batches_carrying_other_language_ids_are_refused():
    # model(**batch) routes by a batch's language_ids field, inside the route to the batch's language:
    # a "de" batch whose field said fr trained only where both masks open, silently
    model = tiny("bert")
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {f"{n}.weight": torch.rand(named[f"{n}.weight"].shape, generator=g) < 0.3
                    for n in hf.model.target_names(model)} for lang in ("de", "fr")}
    hf.convert(model, kind="subnetwork", masks=masks)
    ids = _lm_batches(1, 1)[0]["input_ids"]
    batch = {"input_ids": ids, "labels": ids}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for field in (torch.ones(len(ids), dtype=torch.long), ["de"] * (len(ids) - 1) + ["fr"]):
        with pytest.raises(ValueError, match="reptile_step: the batches of 'de' carry language_ids"):
            subnetworks.reptile_step(model, {"de": [{**batch, "language_ids": field}]}, masks, inner_lr=0.1)
        with pytest.raises(ValueError, match="fomaml_step: the batches of 'de' carry language_ids"):
            subnetworks.fomaml_step(model, {"de": {**batch, "language_ids": field}}, {"de": batch}, masks, 0.1, 1,
                                    subnetworks.fomaml_optimizer(model, {"de": masks["de"]}, lr=0.1))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    subnetworks.reptile_step(model, {"de": [{**batch, "language_ids": torch.zeros(len(ids), dtype=torch.long)}]},
                             masks, inner_lr=0.1)  # its own language: fine
    # per-token ids with -1 (no update) on padding: the step of the batch without the field (the
    # padding's rows get no gradient either way); they were refused as "other languages"
    pad = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    pad["attention_mask"][:, -1], pad["labels"][:, -1] = 0, -100
    per_token = torch.zeros_like(ids)
    per_token[:, -1] = -1
    twin = copy.deepcopy(model)
    subnetworks.reptile_step(model, {"de": [{**pad, "language_ids": per_token}]}, masks, inner_lr=0.1)
    subnetworks.reptile_step(twin, {"de": [pad]}, masks, inner_lr=0.1)
    changed = [n for n, p in twin.named_parameters() if not torch.equal(p, before[n])]
    assert changed
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, dict(twin.named_parameters())[n], rtol=0, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="or to none"):  # every id -1: the batch would train nothing
        subnetworks.reptile_step(model, {"de": [{**pad, "language_ids": torch.full_like(ids, -1)}]}, masks, inner_lr=0.1)


def test_reptile_step_refuses_inner_steps_below_one_and_cycles_short_batches():
    """inner_steps=0 once returned {} having trained nothing, and a language with fewer batches
    than inner_steps escaped as a bare StopIteration after its first inner steps, its weights
    not restored. Now 0 raises, and short batches cycle, as in fomaml_step: the step equals the
    one given the batches repeated."""
    model = tiny("bert")
    twin = copy.deepcopy(model)
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    before = {n: p.detach().clone() for n, p in named.items()}
    with pytest.raises(ValueError, match="inner_steps must be at least 1, got 0"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1)}, masks, inner_steps=0)
    with pytest.raises(ValueError, match=r"batches for languages \['fr'\] are empty"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1), "fr": []}, masks)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    de, fr = _lm_batches(2, 1), _lm_batches(1, 2)
    subnetworks.reptile_step(model, {"de": iter(de), "fr": fr[0]}, masks, inner_lr=0.1, inner_steps=3)
    subnetworks.reptile_step(twin, {"de": de + de[:1], "fr": fr * 3}, masks, inner_lr=0.1, inner_steps=3)
    for n, p in twin.named_parameters():
        torch.testing.assert_close(named[n], p, rtol=0, atol=0)


def test_fomaml_step_checks_its_batches_before_any_inner_step():
    """A query given as a list of batches once failed (an AttributeError naming nothing) after the
    language's inner steps, leaving the adapted weights in the model; an empty support list was a
    ZeroDivisionError."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names}}
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    before = {n: p.detach().clone() for n, p in named.items()}
    with pytest.raises(ValueError, match=r"query\['de'\] must be one batch"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)}, masks, 0.1, 1, opt)
    with pytest.raises(ValueError, match=r"support\['de'\] must be a batch .* or a non-empty list"):
        subnetworks.fomaml_step(model, {"de": []}, {"de": _lm_batches(1, 2)[0]}, masks, 0.1, 1, opt)
    # a second support batch with one inner step was never seen
    with pytest.raises(ValueError, match=r"support lists more batches than inner_steps=1 for \{'de': 2\}"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(2, 1)}, {"de": _lm_batches(1, 2)[0]}, masks, 0.1, 1, opt)
    with pytest.raises(ValueError, match=r"batches lists more batches than inner_steps=2 for \{'de': 3\}"):
        subnetworks.reptile_step(model, {"de": _lm_batches(3, 1)}, masks, inner_steps=2)
    assert all(torch.equal(p, before[n]) for n, p in named.items())


def test_meta_steps_refuse_a_language_whose_loss_is_not_finite_and_change_nothing():
    """A batch with no labelled token gives an HF model a NaN loss and a zero gradient: the
    language moved nothing but counted in the mean, so the others' Reptile update and the FOMAML
    outer gradient shrank by (L-1)/L, with only the returned NaN to show it. Now both steps raise
    after restoring θ, before the update (and the outer optimizer's step)."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    unlabelled = {**_lm_batches(1, 2)[0], "labels": torch.full((4, 8), -100)}
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    before = {n: p.detach().clone() for n, p in named.items()}
    with pytest.raises(ValueError, match=r"reptile_step: the loss of \['fr'\] was not finite"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1), "fr": [_lm_batches(1, 3)[0], unlabelled]}, masks,
                                 inner_lr=0.1, inner_steps=2)
    with pytest.raises(ValueError, match=r"fomaml_step: the loss of \['fr'\] was not finite"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 3)},
                                {"de": _lm_batches(1, 4)[0], "fr": unlabelled}, masks, 0.1, 1, opt)
    with pytest.raises(ValueError, match=r"fomaml_step: the loss of \['de'\] was not finite"):  # an inner step's
        subnetworks.fomaml_step(model, {"de": unlabelled, "fr": _lm_batches(1, 3)},
                                {"de": _lm_batches(1, 4)[0], "fr": _lm_batches(1, 5)[0]}, masks, 0.1, 1, opt)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    assert not opt.state_dict()["state"] or all(float(s["step"]) == 0 for s in opt.state_dict()["state"].values())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_meta_steps_refuse_a_finite_loss_with_a_non_finite_gradient_and_change_nothing(kind):
    """A finite loss with an inf/NaN gradient on a language's entries (a half-precision backward
    that overflowed) passed the loss check: Reptile's inner step wrote inf/NaN into θ_l and the
    mean carried it into θ; FOMAML's outer gradient carried it into θ and the outer optimizer's
    state. Both now raise as for a non-finite loss, θ and the outer optimizer untouched."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    masks = {lang: {n: torch.rand(named[n].shape, generator=g) < 0.3 for n in names} for lang in ("de", "fr")}
    spoiled = {}  # {id(batch): the language whose entry its loss gives the bad gradient}

    def loss_fn(m, b):
        loss = m(**b).loss
        lang = spoiled.get(id(b))
        if lang is None:
            return loss
        i = int(masks[lang][names[0]].reshape(-1).nonzero()[0])  # an entry the language's step reads
        w = named[names[0]].reshape(-1)[i]
        zero = w - w.detach()  # 0, with gradient 1
        extra = zero.abs().sqrt() if kind == "inf" else torch.where(torch.tensor(True), zero * 0, (zero - 1).sqrt())
        return loss + extra

    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    before = {n: p.detach().clone() for n, p in named.items()}
    fr_inner = _lm_batches(1, 3)
    spoiled.clear()
    spoiled.update({id(fr_inner[0]): "fr"})  # one of fr's inner batches
    with pytest.raises(ValueError, match=r"reptile_step: the loss of \['fr'\] was not finite, or its gradient was not"):
        subnetworks.reptile_step(model, {"de": _lm_batches(1, 1), "fr": fr_inner}, masks, inner_lr=0.1,
                                 inner_steps=1, loss_fn=loss_fn)
    fr_query = _lm_batches(1, 5)[0]
    spoiled.clear()
    spoiled.update({id(fr_query): "fr"})  # fr's query batch: its gradient is the outer one
    with pytest.raises(ValueError, match=r"fomaml_step: the loss of \['fr'\] was not finite, or its gradient was not"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 3)},
                                {"de": _lm_batches(1, 4)[0], "fr": fr_query}, masks, 0.1, 1, opt, loss_fn=loss_fn)
    de_inner = _lm_batches(1, 1)
    spoiled.clear()
    spoiled.update({id(de_inner[0]): "de"})  # one of de's inner batches
    with pytest.raises(ValueError, match=r"fomaml_step: the loss of \['de'\] was not finite, or its gradient was not"):
        subnetworks.fomaml_step(model, {"de": de_inner, "fr": _lm_batches(1, 3)},
                                {"de": _lm_batches(1, 4)[0], "fr": _lm_batches(1, 5)[0]}, masks, 0.1, 1, opt,
                                loss_fn=loss_fn)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    assert not opt.state_dict()["state"] or all(float(s["step"]) == 0 for s in opt.state_dict()["state"].values())
    assert all(p.grad is None for p in model.parameters())


def test_reptile_step_refuses_an_unshuffled_data_loader_it_would_restart_every_step():
    # each call iterated the loader afresh: with shuffle=False every meta-step took its first batch
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names}}
    data = _lm_batches(3, 1)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    before = {n: p.detach().clone() for n, p in named.items()}
    with pytest.raises(ValueError, match=r"batches for \['de'\] is a DataLoader without shuffle.*iter\(loader\)"):
        subnetworks.reptile_step(model, {"de": loader}, masks, inner_steps=1)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    # an iterator kept across steps goes on through the data; a shuffled loader draws afresh
    subnetworks.reptile_step(model, {"de": iter(loader)}, masks, inner_steps=1)
    subnetworks.reptile_step(model, {"de": torch.utils.data.DataLoader(data, batch_size=None, shuffle=True)}, masks,
                             inner_steps=1)
    # fomaml_step takes no loader at all: it says so, not to pass iter(loader), which it refuses too
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-3)
    for support in (loader, iter(loader)):
        with pytest.raises(ValueError, match=r"support\['de'\] must be a batch \(a dict of tensors\) or a non-empty list"):
            subnetworks.fomaml_step(model, {"de": support}, {"de": data[0]}, masks, 0.1, 1, opt)


def test_meta_learning_refuses_a_language_whose_masks_open_no_entry():
    """fomaml_step failed inside torch's optimizer ("optimizer got an empty parameter list", naming
    no language) for a language whose masks are all False; reptile_step took it, trained nothing
    and counted it in the mean. Both now name the language before any step."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names},
             "fr": {n: torch.zeros(named[n].shape, dtype=torch.bool) for n in names}}
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    before = {n: p.detach().clone() for n, p in named.items()}
    batch = _lm_batches(1, 1)[0]
    with pytest.raises(ValueError, match=r"fomaml_step: the masks of languages \['fr'\] open no entry"):
        subnetworks.fomaml_step(model, {"de": batch, "fr": batch}, {"de": batch, "fr": batch}, masks, 0.1, 1, opt)
    with pytest.raises(ValueError, match=r"reptile_step: the masks of languages \['fr'\] open no entry"):
        subnetworks.reptile_step(model, {"de": batch, "fr": batch}, masks)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    # a step of no language at all moved nothing and returned {} (an emptied batch dict went unnoticed)
    with pytest.raises(ValueError, match="fomaml_step: no language was given"):
        subnetworks.fomaml_step(model, {}, {}, masks, 0.1, 1, opt)
    with pytest.raises(ValueError, match="reptile_step: no language was given"):
        subnetworks.reptile_step(model, {}, masks)


def test_meta_learning_leaves_the_model_as_it_was_when_a_step_fails():
    """A frozen parameter named in fomaml_step's masks once failed (a RuntimeError naming nothing)
    at the query gradient, after the inner steps had moved the other masked weights; a batch whose
    forward fails after an inner step (a query batch, or reptile_step's second support batch) left
    the adapted weights in the model too."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:4]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names}}
    opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
    before = {n: p.detach().clone() for n, p in named.items()}
    bad = {**_lm_batches(1, 2)[0]}
    bad["labels"] = bad["labels"][:, :3].contiguous()  # the loss refuses labels of another length
    with pytest.raises(ValueError, match="batch_size"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": bad}, masks, 0.5, 2, opt)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    with pytest.raises(ValueError, match="batch_size"):
        subnetworks.reptile_step(model, {"de": [_lm_batches(1, 1)[0], bad]}, masks, inner_lr=0.5, inner_steps=2)
    assert all(torch.equal(p, before[n]) for n, p in named.items())
    named[names[-1]].requires_grad_(False)
    with pytest.raises(ValueError, match=rf"fomaml_step: masks\['de'\] name '{names[-1]}', which does not require grad"):
        subnetworks.fomaml_step(model, {"de": _lm_batches(1, 1)}, {"de": _lm_batches(1, 2)[0]}, masks, 0.5, 2, opt)
    assert all(torch.equal(p, before[n]) for n, p in named.items())


def test_dynamic_masks_callback_checks_its_probe_batches_before_any_step(tmp_path):
    """Empty probe batches for a language were a ZeroDivisionError at the end of the first step, and
    probe batches for other languages than the model's were refused only then: the step had been
    taken."""
    with pytest.raises(ValueError, match=r"probe_batches for \['fr'\] are empty"):
        subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 1), "fr": []}, every=1, density=0.1)
    # one batch, not a list of them: read as its field names, an AttributeError after the first step
    with pytest.raises(TypeError, match=r"DynamicMasksCallback: probe_batches\['fr'\] must be an iterable of batches, got one batch"):
        subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)[0]}, every=1, density=0.1)
    model, _ = _structured_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 1), "it": _lm_batches(1, 2)}, every=1,
                                                density=0.1)
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                            callbacks=[callback])
    with pytest.raises(ValueError, match=r"probe batches for \['de', 'it'\], the model has \['de', 'fr'\]"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_dynamic_masks_callback_checks_its_densities_and_every_at_construction():
    """A density outside [0, 1] raised only at the first re-selection, after `every` steps had
    trained; every=2.5 re-selected at steps 5, 10, ... and every=True at each step."""
    probe = {"de": _lm_batches(1, 1), "fr": _lm_batches(1, 2)}
    for kwargs in ({"density": 1.5}, {"heads_density": -0.1, "neurons_density": 0.5},
                   {"heads_density": 0.5, "neurons_density": float("nan")}):
        name = next(n for n, d in kwargs.items() if not 0 <= d <= 1)
        with pytest.raises(ValueError, match=f"DynamicMasksCallback: {name}: density must"):
            subnetworks.DynamicMasksCallback(probe, every=1, **kwargs)
    for every in (2.5, True):
        with pytest.raises(TypeError, match="DynamicMasksCallback: every must be an int"):
            subnetworks.DynamicMasksCallback(probe, every=every, density=0.1)


def test_dynamic_masks_callback_refuses_a_run_too_short_to_ever_reselect(tmp_path):
    """every=3 in a run of 2 optimizer steps never re-selected: the run trained static masks while
    scoring the probe batches at every step, and said nothing."""
    model, _ = _structured_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = {"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}
    callback = subnetworks.DynamicMasksCallback(probe, every=3, density=0.1)
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                            callbacks=[callback])
    with pytest.raises(ValueError, match=r"every=3 is more than the run's 2 optimizer steps"):
        trainer.train()
    assert callback.reselections == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_dynamic_masks_callback_starts_each_fresh_run_with_no_scores(tmp_path):
    """One callback over two fresh runs (hyperparameter_search's trials with model_init, or a second
    trainer): the first run's last steps, after its last re-selection, left their scores, and the
    second run's first re-selection added them to its own (another model's importances), silently.
    A resumed run keeps the checkpoint's scores (test_dynamic_masks_run_resumed_...)."""
    from xlsparse.nn import SubnetworkLinear

    probe = {"de": _lm_batches(2, 11), "fr": _lm_batches(2, 12)}

    def run(callback, steps, seed):
        model, _ = _structured_model("llama", seed)
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, steps), train_dataset=_MixedData(),
                                      callbacks=[callback]).train()
        return {n: layer.masks for n, layer in hf.model._converted(model, SubnetworkLinear)}

    shared = subnetworks.DynamicMasksCallback(probe, every=2, heads_density=0.5, neurons_density=0.25)
    run(shared, 3, seed=5)
    assert shared.scores and shared.reselections == 1  # step 3's scores, never used by that run
    second = run(shared, 2, seed=1)
    alone = subnetworks.DynamicMasksCallback(probe, every=2, heads_density=0.5, neurons_density=0.25)
    want = run(alone, 2, seed=1)
    for n, m in want.items():
        assert torch.equal(second[n], m), n
    assert shared.reselections == alone.reselections == 1


def test_dynamic_masks_callback_refuses_an_optimizer_it_cannot_re_mask_before_any_step(tmp_path):
    """optimizers=(a torch AdamW, ...) trained `every` steps, then the first re-selection raised."""
    model, _ = _structured_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = subnetworks.DynamicMasksCallback({"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}, every=2,
                                                density=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # SubnetworkTrainer itself refuses it now, at construction (its weight decay moves every entry)
    with pytest.raises(TypeError, match="SubnetworkTrainer: optimizers= must hold an xlsparse masked optimizer"):
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                      callbacks=[callback], optimizers=(opt, None))
    with pytest.raises(TypeError, match="DynamicMasksCallback: optimizer must be an xlsparse masked optimizer.*AdamW"):
        callback.on_train_begin(_args(tmp_path, 2), None, None, model=model, optimizer=opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_subnetwork_trainer_refuses_a_caller_s_optimizer_that_steps_outside_the_subnetworks(tmp_path):
    """optimizers=(torch AdamW, ...) trained, and its weight decay moved every entry of the converted
    weights outside the masks (only extract_diff noticed, afterwards; merge_and_unload kept them);
    so did a MaskedAdamW that opens more than the masks. One within the masks' union is used as given."""
    from xlsparse.hf import continual
    from xlsparse.nn import SubnetworkLinear

    model, masks = _structured_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(TypeError, match="SubnetworkTrainer: optimizers= must hold an xlsparse masked optimizer"):
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                      optimizers=(torch.optim.AdamW(trainable, lr=1e-2), None))
    whole = xlsparse.optim.MaskedAdamW(trainable, [None] * len(trainable), lr=1e-2)
    with pytest.raises(ValueError, match="SubnetworkTrainer: the optimizer steps .* entries of .* that no language"):
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                      optimizers=(whole, None))
    with pytest.raises(TypeError, match="continual_trainer: optimizers= must hold an xlsparse masked optimizer"):
        continual.continual_trainer(model, masks, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                    optimizers=(torch.optim.AdamW(trainable, lr=1e-2), None))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # within the union: trains, and every entry outside the masks keeps its value from convert
    layers = {f"{n}.weight": layer for n, layer in hf.model._converted(model, SubnetworkLinear)}
    named = dict(model.named_parameters())
    confined = xlsparse.optim.MaskedAdamW(
        trainable, [layers[n].trainable_mask() if n in layers else None for n, p in named.items() if p.requires_grad],
        lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the union itself: no warning
        trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                                optimizers=(confined, None))
    trainer.train()
    for n in masks["de"]:
        union = masks["de"][n] | masks["fr"][n]
        assert torch.equal(named[n][~union], before[n][~union]), n
    assert any(not torch.equal(named[n], before[n]) for n in masks["de"])
    # a subset of the union may be meant, but the entries left out never train: said, not silent
    first = next(iter(layers))
    subset = layers[first].trainable_mask().clone()
    rows, cols = subset.nonzero()[:3].T
    subset[rows, cols] = False
    narrow = xlsparse.optim.MaskedAdamW([named[first]], [subset], lr=1e-2)
    with pytest.warns(UserWarning, match="SubnetworkTrainer: the optimizer leaves out 3 entries of "
                                         f"{re.escape(first)} that a language's mask opens"):
        subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 2), train_dataset=_MixedData(),
                                      optimizers=(narrow, None))


def test_structured_reselection_refuses_a_converted_layer_outside_the_heads_and_neurons(tmp_path):
    """structured_masks opens no entry of a layer outside the blocks' Q/K/V/O and FFN (the MLM head's
    transform here): the first re-selection gave it empty masks for every language, and it stopped
    training, silently. Per-entry re-selection ranks it with the others."""
    model = tiny("bert")
    heads, neurons = subnetworks.structured_importance(model, _lm_batches(1, 1))
    g = torch.Generator().manual_seed(1)
    masks = {lang: subnetworks.structured_masks(model, torch.rand(heads.shape, generator=g),
                                                torch.rand(neurons.shape, generator=g), 0.5, 0.25) for lang in ("de", "fr")}
    head = "cls.predictions.transform.dense"
    for lang in masks:
        masks[lang][f"{head}.weight"] = torch.ones(32, 32, dtype=torch.bool)
    hf.convert(model, [n[: -len(".weight")] for n in masks["de"]], kind="subnetwork", masks=masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = {"de": _lm_batches(1, 11), "fr": _lm_batches(1, 12)}
    structured = subnetworks.DynamicMasksCallback(probe, every=1, heads_density=0.5, neurons_density=0.25)
    trainer = subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1), train_dataset=_MixedData(),
                                            callbacks=[structured])
    with pytest.raises(ValueError, match=rf"\['{head}'\] are converted but hold no attention head or FFN neuron"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert bool(model.get_submodule(head).masks.all())
    per_entry = subnetworks.DynamicMasksCallback(probe, every=1, density=0.1)
    subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1), train_dataset=_MixedData(),
                                  callbacks=[per_entry]).train()
    assert per_entry.reselections == 1


@pytest.mark.parametrize("how", SHARDING)
def test_subnetwork_trainer_refuses_fsdp_and_deepspeed_up_front(tmp_path, monkeypatch, how):
    """Accelerate's FSDP plugin replaces every parameter when train() wraps the model; DeepSpeed
    points the optimizer at flat copies (ZeRO 1/2, fp16/bf16) or, with an `optimizer` in its
    config, trains with its own dense Adam: the masks keyed by parameter would not hold. All were
    accepted; they are refused at construction, naming the argument, with nothing written, and
    continual_trainer refuses before it converts the model."""
    from xlsparse.hf import continual

    model, _ = _structured_model("bert")
    args, other = [ask_for_sharding(monkeypatch, a, how) for a in [_args(tmp_path, 1), _args(tmp_path, 1)]]
    with pytest.raises(ValueError, match=f"(?s){how}.*SubnetworkTrainer does not run under"):
        subnetworks.SubnetworkTrainer(model, args, train_dataset=_MixedData())  # args given by position too
    plain = tiny("bert")
    masks = {lang: {"bert.encoder.layer.0.output.dense.weight": torch.ones(32, 48, dtype=torch.bool)} for lang in ("de", "fr")}
    with pytest.raises(ValueError, match=f"(?s){how}.*continual_trainer does not run under"):
        continual.continual_trainer(plain, masks, args=other, train_dataset=_MixedData())
    assert getattr(plain, "xlsparse_config", None) is None
    assert not [f for _, _, files in os.walk(tmp_path) for f in files]


@pytest.mark.parametrize("head", [True, False])
def test_subnetwork_trainer_refuses_liger_over_a_subnetwork_head(tmp_path, head):
    """TrainingArguments.use_liger_kernel computes a causal LM's training loss from
    `lm_head.weight` itself (fused linear cross-entropy), never calling the head: a SubnetworkLinear
    head's gradient skipped its per-language masks (German examples moved all 733 head entries
    open to French alone). A head left plain is not refused."""
    model = tiny("llama")
    names = ["model.layers.0.mlp.up_proj.weight"] + (["lm_head.weight"] if head else [])
    named = dict(model.named_parameters())
    masks = {lang: {n: torch.rand(named[n].shape) < 0.5 for n in names} for lang in ("de", "fr")}
    hf.convert(model, [n[: -len(".weight")] for n in names], kind="subnetwork", masks=masks)
    args = _args(tmp_path, 1, use_liger_kernel=True)
    if not head:
        subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData())
        return
    with pytest.raises(ValueError, match="use_liger_kernel.*SubnetworkTrainer.*SubnetworkLinear"):
        subnetworks.SubnetworkTrainer(model=model, args=args, train_dataset=_MixedData())


def test_continual_trainer_refuses_liger_over_a_masked_head_before_converting(tmp_path):
    """continual_trainer converts the caller's model: masks over the head with use_liger_kernel were
    refused only by SubnetworkTrainer, after every named layer had become a SubnetworkLinear."""
    from xlsparse.hf import continual

    model = tiny("llama")
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    named = dict(model.named_parameters())
    masks = {lang: {n: torch.rand(named[n].shape) < 0.5 for n in names} for lang in ("de", "fr")}
    with pytest.raises(ValueError, match="use_liger_kernel.*continual_trainer.*'lm_head'.*named by the masks"):
        continual.continual_trainer(model, masks, args=_args(tmp_path, 1, use_liger_kernel=True),
                                    train_dataset=_MixedData())
    assert getattr(model, "xlsparse_config", None) is None
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("entry", ["reptile_step", "fomaml_step", "SubnetworkTrainer", "continual_update",
                                   "continual_trainer", "train_expert"])
def test_every_masked_trainer_refuses_a_max_norm_embedding_before_anything_changes(tmp_path, entry):
    """nn.Embedding(max_norm=...) rewrites the rows it reads in every forward, frozen or not: entries
    outside the masks (or an expert's support) changed, which every recipe here promises to keep.
    LT-SFT refused it; the others trained on."""
    from xlsparse.hf import continual, xelm

    model = tiny("bert")
    model.bert.embeddings.word_embeddings.max_norm = 0.05
    names = [f"{n}.weight" for n in hf.model.target_names(model)][:4]
    named = dict(model.named_parameters())
    masks = {lang: {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names} for lang in ("de", "fr")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    batch = _lm_batches(1, 1)[0]
    with pytest.raises(ValueError, match=rf"{entry}.*bert\.embeddings\.word_embeddings .*max_norm"):
        if entry == "reptile_step":
            subnetworks.reptile_step(model, {"de": [batch]}, masks, inner_lr=0.1, outer_lr=0.5, inner_steps=1)
        elif entry == "fomaml_step":
            opt = subnetworks.fomaml_optimizer(model, masks, lr=1e-2)
            subnetworks.fomaml_step(model, {"de": batch}, {"de": batch}, masks, 0.1, 1, opt)
        elif entry == "SubnetworkTrainer":
            hf.convert(model, kind="subnetwork", masks=masks)
            modules = {n: type(m) for n, m in model.named_modules()}
            subnetworks.SubnetworkTrainer(model=model, args=_args(tmp_path, 1), train_dataset=_MixedData(only=0))
        elif entry == "continual_update":
            continual.continual_update(model, [{**batch, "language_ids": torch.zeros(len(batch["input_ids"]),
                                                                                     dtype=torch.long)}], masks)
        elif entry == "continual_trainer":
            continual.continual_trainer(model, masks, args=_args(tmp_path, 1), train_dataset=_MixedData(only=0))
        else:
            xelm.train_expert(model, [batch], density=0.05, progress=False)
    assert {n: type(m) for n, m in model.named_modules()} == modules  # nothing converted
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
