"""convert / route / merge / extract_diff on tiny BERT, XLM-R, Llama and GPT-2."""
import contextlib
import copy
import inspect

import pytest
import torch
import transformers
from tiny_models import ARCHS, SHARED_ARCHS, VOCAB, batch, tiny

import xlsparse
from xlsparse import hf
from xlsparse.diff import SparseDelta, SparseDiff
from xlsparse.nn import MultiDeltaLinear, SparseDeltaLinear, SubnetworkLinear


def _bits_equal(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def _randomise_deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SparseDeltaLinear):
                m.delta_values.copy_(torch.randn(m.delta_values.shape, generator=g) * 0.1)


def _random_diff(model, density, seed):
    """A SparseDiff over the block linear weights of an unconverted model."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in hf.model.target_names(model):
        w = dict(model.named_parameters())[f"{name}.weight"]
        k = max(1, int(density * w.numel()))
        idx = torch.randperm(w.numel(), generator=g)[:k].sort().values
        deltas[f"{name}.weight"] = SparseDelta(idx, torch.randn(k, generator=g) * 0.2, w.shape)
    return SparseDiff(deltas)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_deltas_are_bit_identical(arch):
    model = tiny(arch)
    ids = batch()
    expect = model(input_ids=ids).logits
    hf.convert(model, density=0.05)
    assert any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    got = model(input_ids=ids).logits
    assert _bits_equal(got, expect), (got - expect).abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_extract_diff_on_the_original_matches_the_converted_model(arch):
    original = tiny(arch)
    model = hf.convert(copy.deepcopy(original), density=0.1)
    _randomise_deltas(model)
    ids = batch()
    converted_out = model(input_ids=ids).logits
    diff = hf.extract_diff(model)
    assert set(diff.deltas) == {f"{n}.weight" for n in hf.model.target_names(original)}
    with diff.applied(original):
        torch.testing.assert_close(original(input_ids=ids).logits, converted_out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_and_unmerge_restores_bit_exactly(arch):
    model = hf.convert(tiny(arch), density=0.1)
    _randomise_deltas(model, 3)
    ids = batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    converted_out = model(input_ids=ids).logits
    hf.merge(model)
    torch.testing.assert_close(model(input_ids=ids).logits, converted_out, rtol=1e-4, atol=1e-5)
    model.train()  # training a merged model would leave every delta without a gradient
    with pytest.raises(RuntimeError, match="merged and in training mode"):
        model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # inference in training mode (no grad) stays allowed
    model.eval()
    hf.unmerge(model)
    for n, p in model.named_parameters():
        assert _bits_equal(p.detach(), before[n]), n
    assert _bits_equal(model(input_ids=ids).logits, converted_out)


def test_k_budget_is_split_over_layers():
    model = hf.convert(tiny("bert"), k=1000)
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    assert sum(m.delta_values.numel() for m in layers) == 1000


def test_target_modules_by_suffix_and_regex():
    model = hf.convert(tiny("bert"), target_modules=["query", "value"], density=0.1)
    names = [n for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    assert names and all(n.endswith(("query", "value")) for n in names)
    model = hf.convert(tiny("llama"), target_modules=r".*\.mlp\.(up|down)_proj", density=0.1)
    names = [n for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    assert len(names) == 4


@pytest.mark.parametrize("bad,exc,match", [
    (dict(target_modules=["nothing"], density=0.1), ValueError, "matched no linear"),
    (dict(target_modules=["query", "valeu"], density=0.1), ValueError, r"target_modules \['valeu'\] matched no linear"),
    (dict(target_modules=["query", "LayerNorm"], density=0.1), ValueError, "LayerNorm"),
    (dict(kind="lora", density=0.1), ValueError, "kind"),
    (dict(), ValueError, "exactly one"),
    (dict(kind="multi"), TypeError, "diffs"),
    (dict(kind="subnetwork"), TypeError, "masks"),
    (dict(density=1.5), ValueError, r"^convert: density must be in \[0, 1\]"),  # once told as from_linear's
    (dict(k=-3), ValueError, "^convert: "),
    (dict(density=True), TypeError, "^convert: density must be a number"),  # True read as 1.0: every entry
])
def test_bad_arguments(bad, exc, match):
    with pytest.raises(exc, match=match):
        hf.convert(tiny("bert"), **bad)


def test_routed_diffs_with_other_entries_are_refused_with_the_way_out():
    """A routed layer holds linear-weight deltas only: a bias entry (from_models without include=)
    is refused, and the error says how to build a diff that fits."""
    model = tiny("bert")
    bias = "bert.encoder.layer.0.attention.self.query.bias"
    diff = SparseDiff({bias: SparseDelta(torch.tensor([0, 3]), torch.ones(2), (32,))})
    with pytest.raises(ValueError, match=r"names '.*query\.bias', which is not the weight .* include=r'weight\$'"):
        hf.convert(model, kind="multi", diffs={"de": diff})


def test_subnetwork_masks_that_are_not_bool_are_refused_before_any_layer_changes():
    """A 0/1 float mask of a later layer was refused by SubnetworkLinear only after the earlier
    layers had been replaced (a half-converted model, no xlsparse_config)."""
    model = tiny("bert")
    names = [f"{n}.weight" for n in hf.model.target_names(model)]
    named = dict(model.named_parameters())
    masks = {"de": {n: torch.ones(named[n].shape, dtype=torch.bool) for n in names}}
    masks["de"][names[3]] = masks["de"][names[3]].float()
    with pytest.raises(TypeError, match=rf"masks\['de'\]\['{names[3]}'\] must be a bool tensor, got torch.float32"):
        hf.convert(model, kind="subnetwork", masks=masks)
    assert not any(isinstance(m, SubnetworkLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()) and getattr(model, "xlsparse_config", None) is None


def test_routed_kinds_refuse_sequence_first_models():
    # XLNet's layers see [S, B, H]: per-example ids along dim 0 would pick sequence positions
    cfg = transformers.XLNetConfig(vocab_size=VOCAB, d_model=16, n_layer=1, n_head=2, d_inner=32)
    model = transformers.XLNetLMHeadModel(cfg)
    diff = xlsparse.SparseDiff({})
    with pytest.raises(ValueError, match="sequence-first"):
        hf.convert(model, kind="multi", diffs={"de": diff, "fr": diff})
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, density=0.1)  # a delta is not routed: fine


def test_routed_kinds_refuse_mixture_of_experts_experts():
    # NLLB-MoE's experts run on the router's token subset, flattened and in router order (top-2: a token
    # twice): per-token ids reshaped onto it routed other tokens' languages, with no error
    cfg = transformers.NllbMoeConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                     decoder_ffn_dim=24, num_experts=2, encoder_sparse_step=1, decoder_sparse_step=1,
                                     max_position_embeddings=40)
    model = transformers.NllbMoeForConditionalGeneration(cfg)
    diff = xlsparse.SparseDiff({})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf.convert(model, kind="multi", diffs={"de": diff, "fr": diff})
    with pytest.raises(ValueError, match="mixture-of-experts"):
        hf.convert(model, kind="subnetwork", masks={"de": {}, "fr": {}})
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, target_modules=r".*self_attn\.(q|v)_proj", kind="multi", diffs={"de": diff, "fr": diff})


@pytest.mark.parametrize("arch", ["longformer", "led"])
def test_routed_kinds_refuse_longformer_attention(arch):
    # Longformer's (and LED's encoder) self-attention transposes to [S, B, H] before query/key/value:
    # with batch size == padded length, per-example ids silently routed sequence positions
    if arch == "longformer":
        cfg = transformers.LongformerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=24, attention_window=[4], max_position_embeddings=40)
        model = transformers.LongformerForMaskedLM(cfg)
    else:
        cfg = transformers.LEDConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                     decoder_ffn_dim=24, attention_window=[4], max_encoder_position_embeddings=40,
                                     max_decoder_position_embeddings=40)
        model = transformers.LEDForConditionalGeneration(cfg)
    diff = xlsparse.SparseDiff({})
    with pytest.raises(ValueError, match="sequence-first"):
        hf.convert(model, kind="multi", diffs={"de": diff, "fr": diff})
    with pytest.raises(ValueError, match="sequence-first"):
        hf.convert(model, kind="subnetwork", masks={"de": {}, "fr": {}})
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, density=0.1)


@pytest.mark.parametrize("head", ["ee", "el"])
def test_routed_kinds_refuse_bros_heads_that_see_the_tokens_sequence_first(head):
    # BROS's SPADE heads run on the encoder's output transposed to [S, B, H]: with S == B per-example ids
    # [1, 0, -1] routed the heads' rows by token position, silently (initial_token_classifier.1 and .3 are
    # default targets; logits up to 100 off those of each example's own language)
    cfg = transformers.BrosConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=40)
    cls = transformers.BrosSpadeEEForTokenClassification if head == "ee" else transformers.BrosSpadeELForTokenClassification
    model = cls(cfg)
    diffs = {"de": xlsparse.SparseDiff({}), "fr": xlsparse.SparseDiff({})}
    targets = None if head == "ee" else ["entity_linker.query", "encoder.layer.0.attention.self.query"]
    with pytest.raises(ValueError, match=r"transposed to \[S, B, H\]"):
        hf.convert(model, targets, kind="multi", diffs=diffs)
    with pytest.raises(ValueError, match=r"transposed to \[S, B, H\]"):
        hf.convert(model, targets, kind="subnetwork", masks={"de": {}})
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, r"bros\.encoder\..*", kind="multi", diffs=diffs)  # the encoder sees [B, S, H]: fine
    x, bbox = torch.randint(3, VOCAB, (3, 3)), torch.rand(3, 3, 8)
    with torch.no_grad(), hf.route(model, [1, 0, -1]):
        model(input_ids=x, bbox=bbox, attention_mask=torch.ones(3, 3, dtype=torch.long))


@pytest.mark.parametrize("holder", ["wrapper", "encoder-decoder"])
def test_routed_kinds_refuse_a_longformer_held_by_another_module(holder):
    # the refusal read the converted model's own config: a module holding a Longformer (a wrapper with no
    # config, or an EncoderDecoderModel, model_type "encoder-decoder") was converted, and with batch size ==
    # padded length per-example ids routed sequence positions (4 examples of 4 tokens: up to 3.5 off)
    cfg = transformers.LongformerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, attention_window=[4], max_position_embeddings=40)
    if holder == "wrapper":
        model = torch.nn.Sequential()
        model.add_module("longformer", transformers.LongformerModel(cfg))
    else:
        decoder = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=24, is_decoder=True, add_cross_attention=True)
        model = transformers.EncoderDecoderModel(encoder=transformers.LongformerModel(cfg),
                                                 decoder=transformers.BertLMHeadModel(decoder))
    diff = xlsparse.SparseDiff({})
    with pytest.raises(ValueError, match="sequence-first"):
        hf.convert(model, kind="multi", diffs={"de": diff, "fr": diff})
    assert not hasattr(model, "xlsparse_config")
    if holder == "encoder-decoder":  # the BERT decoder's layers see [B, S, H]: they may be routed
        hf.convert(model, target_modules=r"decoder\..*\.(query|value)", kind="multi", diffs={"de": diff, "fr": diff})

class _Holder(torch.nn.Module):
    """A module that holds a model and has no config of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_the_tied_refusal_says_how_to_untie_and_that_way_works():
    # it advised config.tie_word_embeddings=False then model.tie_weights(), which unties nothing in
    # transformers 5: the same refusal came back
    model = tiny("gpt2")
    with pytest.raises(ValueError, match=r"m = model.get_submodule\('lm_head'\); m.weight = nn.Parameter"):
        hf.convert(model, ["lm_head"], density=0.1)
    m = model.get_submodule("lm_head")
    m.weight = torch.nn.Parameter(m.weight.detach().clone())
    hf.convert(model, ["lm_head"], density=0.1)


def test_the_tied_refusal_names_every_other_use():
    # T5's `shared` is one tensor with the encoder's and decoder's embed_tokens and lm_head; the
    # refusal named the first alone, and its advice, followed for `shared` (a module the forward
    # never calls), gave it a copy that got no gradient: a saved module that trained nothing
    model = tiny("t5")
    with pytest.raises(ValueError, match=r"'shared.weight' is tied to 'encoder.embed_tokens.weight', "
                                         r"'decoder.embed_tokens.weight', 'lm_head.weight' \(one tensor, 4 uses\).*"
                                         r"where the model calls 'shared' itself"):
        hf.convert(model, density=0.1, modules_to_save=["shared"])
    m = model.get_submodule("shared")
    m.weight = torch.nn.Parameter(m.weight.detach().clone())
    hf.convert(model, density=0.1, modules_to_save=["shared"])
    model(input_ids=batch(), decoder_input_ids=batch()).logits.sum().backward()
    assert m.weight.grad is None  # what the message warns of


def _logits(model, ids):
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", SHARED_ARCHS)
def test_shared_and_factorised_families_round_trip(arch, tmp_path):
    """ALBERT (one layer's linears run at every depth), DistilBERT and OPT (tied heads, OPT's
    project_in/out as extra targets) and T5 (`shared` used four times, scaled tied head): the
    converted model's diff, applied to a fresh base, gives its logits; revert gives the base's back
    bit for bit; save/load and merge give the converted model's logits."""
    base = tiny(arch)
    targets = {"albert": ["embedding_hidden_mapping_in", "query", "ffn_output"], "opt": ["project_in", "project_out", "fc1"]}
    model = hf.convert(copy.deepcopy(base), targets.get(arch), density=0.2)
    assert len(hf.model.target_names(base, targets.get(arch))) == len(model.xlsparse_config.target_modules)
    _randomise_deltas(model, 5)
    ids = batch()
    with torch.no_grad():
        want, plain = _logits(model, ids), _logits(base, ids)
        fresh = tiny(arch)
        handle = xlsparse.apply([hf.extract_diff(model)], fresh)
        torch.testing.assert_close(_logits(fresh, ids), want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(want, plain, rtol=1e-4, atol=1e-5)  # the deltas change the logits
        handle.revert()
        assert _bits_equal(_logits(fresh, ids), plain)
        hf.save_pretrained(model, tmp_path)
        assert _bits_equal(_logits(hf.from_pretrained(tiny(arch), tmp_path), ids), want)
        hf.merge(model)
        torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_tied, error", [("lm_head", TypeError), (["lm_head", "h.0.attn.c_attn"], ValueError)])
def test_keep_tied_names_target_layers_only(keep_tied, error):
    # a str was matched by substring, and a name that is no target was ignored: the tied head was kept
    # (or refused) by accident of spelling
    model = tiny("gpt2")
    with pytest.raises(error, match="keep_tied"):
        hf.convert(model, ["lm_head"], density=0.1, keep_tied=keep_tied)
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, ["lm_head"], density=0.1, keep_tied=["lm_head"])


@pytest.mark.parametrize("wrapped", [False, True])
def test_per_token_ids_are_refused_on_an_encoder_decoder_model(wrapped):
    # the decoder's layers see [B, S_target]: source-token ids were applied to target positions whenever
    # the lengths matched (and raised otherwise); the check read only the routed model's own config,
    # so a module holding T5 took them
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    model = _Holder(model) if wrapped else model
    diff = xlsparse.SparseDiff({})
    hf.convert(model, kind="multi", diffs={"de": diff, "fr": diff})
    ids = batch(2, 6)
    per_token = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, -1, -1]])
    with pytest.raises(ValueError, match="encoder-decoder"):
        with hf.route(model, per_token):
            model(input_ids=ids, decoder_input_ids=ids)
    if not wrapped:  # a batch field reaches only a model that takes language_ids itself
        with pytest.raises(ValueError, match="encoder-decoder"):
            model(input_ids=ids, decoder_input_ids=ids, language_ids=per_token)
    with hf.route(model, [0, 1]):  # per example: fine
        model(input_ids=ids, decoder_input_ids=ids[:, :4])


def test_per_token_ids_are_refused_on_deberta_with_relative_attention():
    # query_proj/key_proj also run on the relative-position embeddings [1, 2·span, H]: one example's
    # per-token ids of length 2·span (8 here) routed those rows by token position, silently
    cfg = transformers.DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=48, max_position_embeddings=64, relative_attention=True,
                                       position_buckets=4, max_relative_positions=64, pos_att_type=["p2c", "c2p"])
    torch.manual_seed(0)
    model = transformers.DebertaV2ForMaskedLM(cfg).eval()
    diffs = {"en": _random_diff(model, 0.05, 1), "de": _random_diff(model, 0.05, 2)}
    hf.convert(model, kind="multi", diffs=diffs)
    ids = batch(1, 8)
    for per_token in (torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0] * 6 + [-1] * 2])):
        with pytest.raises(ValueError, match="per-token language ids.*DeBERTa"):
            with hf.route(model, per_token):
                model(input_ids=ids)
        with pytest.raises(ValueError, match="per-token language ids.*DeBERTa"):
            model(input_ids=ids, language_ids=per_token)
    with hf.route(model, [1]):  # one id for the example: its language everywhere, the relative rows too
        model(input_ids=ids)
    # the relative rows [1, 2·span, H] serve every example: a batch of two raised "fit neither the batch's
    # examples [1]", naming no cause
    with pytest.raises(ValueError, match=r"one input shared by the batch's examples .*DeBERTa"):
        with hf.route(model, [1, 0]):
            model(input_ids=batch(2, 8))


def test_per_token_ids_are_refused_on_a_decoder_with_cross_attention():
    # the cross-attention's key and value projections see the encoder's states [B, S_enc, H]: with
    # S_enc equal to the decoder's length, per-token ids routed encoder positions by token, silently
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, is_decoder=True,
                                  add_cross_attention=True)
    torch.manual_seed(0)
    model = transformers.BertLMHeadModel(cfg).eval()
    hf.convert(model, kind="multi", diffs={"en": _random_diff(model, 0.05, 1), "de": _random_diff(model, 0.05, 2)})
    ids, states = batch(2, 6), torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="per-token language ids.*cross-attention"):
        with hf.route(model, torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, -1]])):
            model(input_ids=ids, encoder_hidden_states=states)
    with hf.route(model, [0, 1]):  # per example: fine
        model(input_ids=ids, encoder_hidden_states=states)


@pytest.mark.parametrize("kind", ["multi", "subnetwork"])
def test_route_refuses_a_routed_head_that_sparse_prediction_runs_on_the_labelled_tokens(kind):
    # ModernBERT's masked LM with sparse_prediction runs its head on the labelled tokens only,
    # gathered to [N, H]: with N equal to the batch size, per-example ids routed labelled token i by
    # example i's id (here row 0's second token by row 1's language), silently
    cfg = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                                        sparse_prediction=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.ModernBertForMaskedLM(cfg).eval()
    targets = ["Wqkv", "head.dense"]
    weights = {f"{n}.weight": model.get_submodule(n).weight for n in hf.model.target_names(model, targets)}
    if kind == "multi":
        diffs = {lang: SparseDiff({n: SparseDelta.from_dense(torch.randn(w.shape) * scale) for n, w in weights.items()})
                 for lang, scale in (("de", 0.2), ("fr", -0.2))}
        hf.convert(model, targets, kind="multi", diffs=diffs)
    else:
        masks = {lang: {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()} for lang in ("de", "fr")}
        hf.convert(model, targets, kind="subnetwork", masks=masks)
    ids, labels = batch(3, 5), torch.full((3, 5), -100)
    labels[0, 1], labels[0, 3], labels[2, 2] = 5, 6, 7  # 3 labelled tokens, as many as examples
    with pytest.raises(ValueError, match="sparse_prediction"):
        model(input_ids=ids, labels=labels, language_ids=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="sparse_prediction"):
        with hf.route(model, ["de", "fr", "fr"]):
            model(input_ids=ids, labels=labels)
    model.sparse_prediction = False  # the head sees [B, S, H]: routed as every other layer
    model(input_ids=ids, labels=labels, language_ids=torch.tensor([0, 1, 1]))


def test_routed_kinds_refuse_torch_transformer_layers_that_are_not_batch_first():
    # nn.TransformerEncoderLayer defaults to batch_first=False: its linear layers see [S, B, H], and
    # with S == B per-example ids were taken as sequence positions, silently
    for kind, arg in (("multi", {"diffs": {"de": xlsparse.SparseDiff({}), "fr": xlsparse.SparseDiff({})}}),
                      ("subnetwork", {"masks": {"de": {}}})):
        layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)  # batch_first=False
        model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        with pytest.raises(ValueError, match="batch_first=False"):
            hf.convert(model, kind=kind, **arg)
        assert not hasattr(model, "xlsparse_config")
    # the layer as the model itself (module name ''): its linears were not refused
    model = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)
    with pytest.raises(ValueError, match="batch_first=False"):
        hf.convert(model, ["linear1", "linear2"], kind="multi", diffs={"de": xlsparse.SparseDiff({})})
    assert not hasattr(model, "xlsparse_config")
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), 1,
                                        enable_nested_tensor=False)
    hf.convert(model, kind="multi", diffs={"de": xlsparse.SparseDiff({})})  # batch-first: fine
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16), 1,
                                        enable_nested_tensor=False)
    hf.convert(model, density=0.1)  # a delta is not routed: fine


def test_routed_kinds_refuse_the_linears_of_a_block_whose_multihead_attention_is_sequence_first():
    # BridgeTower's vision blocks hold an nn.MultiheadAttention with batch_first=False; their
    # mlp.c_fc/c_proj (default targets) see [S, B, H], and with S == B per-example ids were taken
    # as patch positions, silently
    cfg = transformers.BridgeTowerConfig(text_config=dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=24),
                                         vision_config=dict(hidden_size=64, num_hidden_layers=1, image_size=8,
                                                            patch_size=4),
                                         hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.BridgeTowerModel(cfg)
    assert "vision_model.visual.transformer.resblocks.0.mlp.c_fc" in hf.model.target_names(model)
    with pytest.raises(ValueError, match=r"resblocks.0.mlp.c_fc.*batch_first=False"):
        hf.convert(model, kind="multi", diffs={"de": xlsparse.SparseDiff({})})
    assert not hasattr(model, "xlsparse_config")
    text = [n for n in hf.model.target_names(model) if not n.startswith("vision_model.")]
    hf.convert(model, text, kind="multi", diffs={"de": xlsparse.SparseDiff({})})  # the text side routes


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_torch_transformer_encoder_layers_run_their_deltas_in_eval_mode(grad, padded):
    # in eval mode torch runs nn.TransformerEncoderLayer by one fused op that reads linear1.weight and
    # linear2.weight (W0) without calling the layers (and nn.TransformerEncoder packs a padded batch into
    # nested tensors for it): a converted model ran the base, 3.3 off the trained model
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    base = torch.nn.TransformerEncoder(layer, 2).eval()
    model = hf.convert(copy.deepcopy(base), kind="delta", density=0.3)
    _randomise_deltas(model)
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.bool)
    if padded:
        mask[1, 3:] = True
    with torch.no_grad():
        plain = base(x, src_key_padding_mask=mask)
        with xlsparse.apply([hf.extract_diff(model)], base):
            want = base(x, src_key_padding_mask=mask)  # the fused op, on W0 + Δ
    with torch.set_grad_enabled(grad):
        got = model(x, src_key_padding_mask=mask)
    keep = ~mask
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[keep], plain[keep], atol=1e-2)

@pytest.mark.parametrize("targets", [None, ["out_proj"]])
def test_the_out_proj_of_multihead_attention_is_never_converted(targets):
    # nn.MultiheadAttention multiplies by out_proj.weight itself and never calls out_proj
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    if targets is None:
        assert "layers.0.self_attn.out_proj" not in hf.model.target_names(model)
        assert "layers.0.linear1" in hf.model.target_names(model)
    else:
        with pytest.raises(ValueError, match="MultiheadAttention"):
            hf.convert(model, target_modules=targets, density=0.1)


def test_the_no_block_linear_error_suggests_only_layers_that_convert():
    """A model without block linear layers is asked for target_modules; the names suggested leave
    out those a target_modules naming them would be refused for (MultiheadAttention's out_proj)."""
    model = torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2), "head": torch.nn.Linear(8, 3)})
    with pytest.raises(ValueError, match=r"no linear layer in encoder/decoder blocks.*\['head'\]\)") as err:
        hf.convert(model, density=0.1)
    assert "out_proj" not in str(err.value)


def test_wavlm_attention_projections_are_never_converted():
    # WavLM's attention passes q/k/v/out_proj.weight to F.multi_head_attention_forward and never calls
    # them: their deltas trained nothing and changed no output
    cfg = transformers.WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                   conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                   num_conv_pos_embedding_groups=2, num_buckets=8, max_bucket_distance=20)
    model = transformers.WavLMModel(cfg)
    names = hf.model.target_names(model)
    assert not [n for n in names if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert "encoder.layers.0.feed_forward.intermediate_dense" in names
    with pytest.raises(ValueError, match="never run"):
        hf.convert(model, target_modules=["q_proj"], density=0.1)


@pytest.mark.parametrize("arch", ["Mamba", "FalconMamba"])
def test_mamba_dt_proj_is_never_converted(arch):
    # Mamba's mixer computes `dt_proj.weight @ time_step` without calling dt_proj: a converted dt_proj's
    # delta changed no output and got no gradient, and convert(density=...) converted it by default
    cfg = getattr(transformers, f"{arch}Config")(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1,
                                                 expand=2, conv_kernel=3, time_step_rank=4)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    names = hf.model.target_names(model)
    assert "backbone.layers.0.mixer.in_proj" in names and not [n for n in names if n.endswith("dt_proj")]
    with pytest.raises(ValueError, match="never run"):
        hf.convert(model, target_modules=["dt_proj"], density=0.1)


@pytest.mark.parametrize("arch, bypassed", [("Mamba", ("x_proj", "out_proj")), ("Mamba2", ("out_proj",))])
def test_mamba_layers_the_fused_training_kernels_read_are_never_converted(arch, bypassed):
    # In training on CUDA with mamba_ssm (or the hub's kernels) the mixer passes these weights to a
    # fused kernel and never calls the layers, so their deltas trained nothing there (no GPU here:
    # the mixer's source shows the hand-over)
    kw = dict(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3)
    if arch == "Mamba2":
        kw.update(num_heads=4, head_dim=8, n_groups=1, chunk_size=8)
    else:
        kw.update(time_step_rank=4)
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**kw))
    names = hf.model.target_names(model)
    assert "backbone.layers.0.mixer.in_proj" in names
    assert not [n for n in names if n.rsplit(".", 1)[-1] in bypassed]
    for name in bypassed:
        with pytest.raises(ValueError, match="never run"):
            hf.convert(model, target_modules=[name], density=0.1)
    source = inspect.getsource(type(model.backbone.layers[0].mixer).forward)  # where it hands them over
    assert all(f"self.{name}.weight" in source for name in bypassed)


def _tdnn_xvector():
    cfg = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                      conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                      num_conv_pos_embedding_groups=2, tdnn_dim=(8, 8), tdnn_kernel=(3, 1),
                                      tdnn_dilation=(1, 1), xvector_output_dim=8)
    return transformers.Wav2Vec2ForXVector(cfg), "tdnn.0.kernel"


def _mobilebert_mlm():
    cfg = transformers.MobileBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=24, intra_bottleneck_size=16,
                                        true_hidden_size=16, num_feedforward_networks=1, max_position_embeddings=32)
    return transformers.MobileBertForMaskedLM(cfg), "cls.predictions.dense"


def _longcat_flash():
    cfg = transformers.LongcatFlashConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_attention_heads=2,
                                          ffn_hidden_size=24, expert_ffn_hidden_size=8, n_routed_experts=4, moe_topk=2,
                                          kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                          v_head_dim=4, max_position_embeddings=32)
    return transformers.LongcatFlashForCausalLM(cfg), "model.layers.0.mlp.router.classifier"


def _layoutlmv3(name):
    cfg = transformers.LayoutLMv3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=24, max_position_embeddings=32, coordinate_size=5,
                                        shape_size=6, visual_embed=False)
    return lambda: (transformers.LayoutLMv3Model(cfg), f"encoder.{name}")


def _detr_segmentation():
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                         out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                                  d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=8,
                                  decoder_attention_heads=8, encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=4)
    return transformers.DetrForSegmentation(cfg), "bbox_attention.k_proj"


@pytest.mark.parametrize("build", [_tdnn_xvector, _mobilebert_mlm, _longcat_flash, _detr_segmentation,
                                   *(_layoutlmv3(n) for n in ("rel_pos_bias", "rel_pos_x_bias", "rel_pos_y_bias"))])
def test_linear_layers_whose_weight_the_parent_reads_are_never_converted(build):
    # a TDNN layer runs F.conv1d on kernel.weight, MobileBERT's LM head multiplies by dense.weight, LongCat-Flash's
    # router runs F.linear on classifier.weight, LayoutLMv3's encoder indexes rel_pos_bias.weight (and the x and
    # y tables) by bucket, DETR's segmentation head runs F.conv2d on bbox_attention.k_proj.weight: converted, their
    # deltas changed no output and got no gradient
    torch.manual_seed(0)
    model, name = build()
    assert name not in hf.model.target_names(model)
    with pytest.raises(ValueError, match="never run"):
        hf.convert(model, target_modules=[name], density=0.1)


class _TopKRouter(torch.nn.Linear):
    """A linear subclass with a forward of its own, as Llama4Router and PhimoeTopKRouter are: it
    returns a tuple, which a converted layer (x Wᵀ + b) does not."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


def test_linear_subclasses_with_a_forward_of_their_own_are_never_converted():
    # Llama4's router is such a layer inside every block: convert replaced it, and the model raised
    # "too many values to unpack" (or, with 2 tokens, unpacked the two rows of the logits)
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.proj = _TopKRouter(8, 3), torch.nn.Linear(8, 8)

        def forward(self, x):
            scores, _ = self.router(x)
            return self.proj(x) * scores.max(-1, keepdim=True).values

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), Block())
    x = torch.randn(2, 5, 8)
    want = model(x)
    assert hf.model.target_names(model) == ["0.proj", "1.proj"]
    with pytest.raises(ValueError, match="forward of its own"):
        hf.convert(model, target_modules=["router"], density=0.5)
    assert not hasattr(model, "xlsparse_config")
    hf.convert(model, density=0.5)
    assert torch.equal(model(x), want)
    falcon = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=VOCAB, hidden_size=16,
                                                                      num_hidden_layers=1, num_attention_heads=2))
    assert "transformer.h.0.self_attention.query_key_value" in hf.model.target_names(falcon)  # x Wᵀ + b all the same

@pytest.mark.parametrize("tp, exact", [(2, True), (2, False), (1, True)])
def test_bloom_layers_sliced_under_pretraining_tp_are_never_converted(tp, exact):
    # BLOOM with pretraining_tp > 1 and slow_but_exact=True runs F.linear on slices of dense.weight
    # and dense_4h_to_h.weight and never calls them: their deltas changed no output
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2, pretraining_tp=tp,
                                   slow_but_exact=exact)
    model = transformers.BloomForCausalLM(cfg).eval()
    sliced = tp > 1 and exact
    names = hf.model.target_names(model)
    assert ("transformer.h.0.self_attention.dense" in names) != sliced
    assert ("transformer.h.0.mlp.dense_4h_to_h" in names) != sliced
    assert "transformer.h.0.mlp.dense_h_to_4h" in names
    if sliced:
        with pytest.raises(ValueError, match="never run"):
            hf.convert(model, target_modules=["dense_4h_to_h"], density=0.5)
        assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())
        return
    ids = batch(2, 5)
    hf.convert(model, target_modules=["dense", "dense_4h_to_h"], density=0.5)
    with torch.no_grad():
        before = model(ids).logits
        for m in model.modules():
            if isinstance(m, SparseDeltaLinear):
                m.delta_values.fill_(1.0)
        assert not torch.equal(model(ids).logits, before)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_mixed_language_routing_equals_per_language_runs(arch):
    original = tiny(arch)
    diffs = {"de": _random_diff(original, 0.05, 1), "fr": _random_diff(original, 0.05, 2)}
    model = hf.convert(copy.deepcopy(original), kind="multi", diffs=diffs)
    assert hf.languages(model) == ["de", "fr"]
    assert any(isinstance(m, MultiDeltaLinear) for m in model.modules())
    ids = batch(4)
    language_ids = torch.tensor([1, -1, 0, 1])
    with hf.route(model, language_ids):
        mixed = model(input_ids=ids).logits
    for row, lang in enumerate(language_ids.tolist()):
        if lang < 0:
            expect = original(input_ids=ids[row:row + 1]).logits
        else:
            with diffs[["de", "fr"][lang]].applied(original):
                expect = original(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], expect, rtol=1e-4, atol=1e-5)


def test_a_batch_without_a_language_leaves_its_deltas_alone():
    """kind="multi" under torch.optim.AdamW with weight decay: a language's deltas get no gradient
    (None) from a batch without its tokens, so the step leaves them bit-identical."""
    original = tiny("bert")
    diffs = {"de": _random_diff(original, 0.05, 1), "fr": _random_diff(original, 0.05, 2)}
    model = hf.convert(original, kind="multi", diffs=diffs).train()
    layers = [m for m in model.modules() if isinstance(m, MultiDeltaLinear)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    for lang in (0, 1, 0):
        before = [layer.delta_values[1 - lang].detach().clone() for layer in layers]
        opt.zero_grad()
        with hf.route(model, torch.tensor([lang, -1, lang])):
            model(input_ids=batch(3)).logits.square().mean().backward()
        opt.step()
        for layer, other in zip(layers, before):
            assert layer.delta_values[lang].grad is not None
            assert layer.delta_values[1 - lang].grad is None
            assert _bits_equal(layer.delta_values[1 - lang].detach(), other)


def test_subnetwork_gradients_follow_each_language_mask():
    model = tiny("bert")
    names = hf.model.target_names(model)
    g = torch.Generator().manual_seed(0)
    masks = {lang: {f"{n}.weight": torch.rand(dict(model.named_parameters())[f"{n}.weight"].shape, generator=g) < 0.2
                    for n in names} for lang in ("de", "fr")}
    model = hf.convert(model, kind="subnetwork", masks=masks)
    layer_name = names[0]
    layer = model.get_submodule(layer_name)
    assert isinstance(layer, SubnetworkLinear)
    ids = batch(2)
    with hf.route(model, torch.tensor([0, 1])):
        model(input_ids=ids, labels=ids).loss.backward()
    grad = layer.weight.grad
    union = masks["de"][f"{layer_name}.weight"] | masks["fr"][f"{layer_name}.weight"]
    assert grad is not None and bool((grad[~union] == 0).all()) and bool((grad[union] != 0).any())


def test_integer_language_keys_must_be_their_own_ids():
    """Routing ids index the languages in insertion order: with diffs {1: a, 0: b}, id 1 ran b,
    the language keyed 0. Such keys are refused before any layer changes; 0, 1, ... in order pass."""
    original = tiny("bert")
    a, b = _random_diff(original, 0.05, 1), _random_diff(original, 0.05, 2)
    model = copy.deepcopy(original)
    with pytest.raises(ValueError, match="language key 1 is at position 0"):
        hf.convert(model, kind="multi", diffs={1: a, 0: b})
    with pytest.raises(ValueError, match="language key '1' is at position 0"):  # names that are numbers too
        hf.convert(model, kind="multi", diffs={"1": a, "0": b})
    assert not any(isinstance(m, MultiDeltaLinear) for m in model.modules())
    names = hf.model.target_names(original)
    masks = {n: torch.ones_like(dict(original.named_parameters())[f"{n}.weight"], dtype=torch.bool) for n in names[:1]}
    with pytest.raises(ValueError, match="language key 1 is at position 0"):
        hf.convert(copy.deepcopy(original), kind="subnetwork", masks={1: {f"{k}.weight": v for k, v in masks.items()}})
    linear = original.get_submodule(names[0])
    with pytest.raises(ValueError, match="language key 1 is at position 0"):
        MultiDeltaLinear.from_linear(linear, {1: a.deltas[f"{names[0]}.weight"]})
    with pytest.raises(ValueError, match="language key 1 is at position 0"):
        SubnetworkLinear.from_linear(copy.deepcopy(linear), {1: masks[names[0]]})
    # keys that are their own ids route as ids and as names alike
    model = hf.convert(copy.deepcopy(original), kind="multi", diffs={0: a, 1: b})
    ids = batch(2)
    with hf.route(model, [1, 1]):
        by_id = model(input_ids=ids).logits
    with hf.route(model, ["1", "1"]):
        by_name = model(input_ids=ids).logits
    assert torch.equal(by_id, by_name)


def test_from_models_of_a_converted_model_points_to_extract_diff():
    # it said "models of another class or prefix?; exclude them", and excluding the delta values
    # gave a diff of the frozen base weights, all zeros
    base = tiny("bert")
    for kind, kwargs in (("delta", dict(density=0.1)), ("multi", dict(diffs={"de": _random_diff(base, 0.05, 1)}))):
        model = hf.convert(copy.deepcopy(base), kind=kind, **kwargs)
        with pytest.raises(ValueError, match=r"converted by xlsparse.hf .*xlsparse.hf.extract_diff\(tuned\)"):
            SparseDiff.from_models(base, model, density=0.05)


def test_route_needs_languages():
    model = hf.convert(tiny("bert"), density=0.1)
    with pytest.raises(ValueError, match="no routed layers"):
        with hf.route(model, torch.tensor([0])):
            pass


def test_print_trainable_parameters(capsys):
    model = tiny("bert")
    for p in model.parameters():
        p.requires_grad_(False)
    hf.convert(model, k=500)
    hf.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert "trainable params: 500 " in out


@pytest.mark.slow  # torch.compile: ~12 s
def test_torch_compile_runs_a_converted_model():
    model = hf.convert(tiny("llama"), density=0.05)
    _randomise_deltas(model, 5)
    ids = batch()
    expect = model(input_ids=ids).logits
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(input_ids=ids).logits, expect, rtol=1e-5, atol=1e-6)
    assert xlsparse.hf.extract_diff(model).nnz > 0


def test_extract_and_save_of_a_compiled_model_are_those_of_the_model(tmp_path):
    # torch.compile's wrapper names every parameter `_orig_mod.<name>`: the check against convert's
    # record took them all for tensors added since, and refused the save
    model = hf.convert(tiny("llama"), density=0.05)
    _randomise_deltas(model, 5)
    compiled = torch.compile(model, backend="aot_eager")
    want, got = hf.extract_diff(model), hf.extract_diff(compiled)
    assert list(got.deltas) == list(want.deltas)
    for name, delta in want.deltas.items():
        assert torch.equal(got.deltas[name].indices, delta.indices)
        assert torch.equal(got.deltas[name].values, delta.values)
    hf.save_pretrained(compiled, tmp_path)
    ids = batch()
    reloaded = hf.from_pretrained(tiny("llama"), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_public_functions_take_a_compiled_model_as_the_model_it_wraps(tmp_path):
    # Only extract_diff and save_pretrained unwrapped torch.compile's wrapper: the others saw
    # names prefixed `_orig_mod.` (importance scores and masks keyed by them, convert's record
    # unknown to extract_diff), and merge_and_unload deleted the wrapper's compiled forward.
    from xlsparse.hf import subnetworks
    from xlsparse.hf.lt_sft import LotteryTicketSparseFineTuner, SftArguments

    model = tiny("bert")
    compiled = torch.compile(model, backend="eager")
    assert hf.tied_parameters(compiled) == hf.tied_parameters(model)
    g = torch.Generator().manual_seed(4)
    batches = {"de": [{"input_ids": (ids := torch.randint(3, VOCAB, (2, 8), generator=g)), "labels": ids}]}
    scores = subnetworks.importance_scores(compiled, batches, progress=False)
    assert list(scores["de"]) == list(subnetworks.importance_scores(model, batches, progress=False)["de"])
    assert not any(name.startswith("_orig_mod.") for name in scores["de"])

    assert hf.convert(compiled, density=0.05) is compiled  # the wrapper back, the model inside converted
    assert any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    _randomise_deltas(model, 5)
    diff = hf.extract_diff(compiled)
    assert diff.nnz > 0 and list(diff.deltas) == list(hf.extract_diff(model).deltas)
    ids = batch()
    expect = model(input_ids=ids).logits
    assert hf.merge_and_unload(compiled) is compiled
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    torch.testing.assert_close(compiled(input_ids=ids).logits, expect, rtol=1e-5, atol=1e-6)  # its forward kept

    # a trainer holds the wrapper as its model: its names would match nothing; it says how to compile
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="torch.compile.*torch_compile=True"):
        LotteryTicketSparseFineTuner(model=torch.compile(tiny("bert"), backend="eager"), args=args,
                                     sft_args=SftArguments(ft_params_num=30, full_ft_max_steps_per_iteration=1,
                                                           sparse_ft_max_steps_per_iteration=1))
    with pytest.raises(ValueError, match="torch.compile.*torch_compile=True"):
        subnetworks.SubnetworkTrainer(model=torch.compile(tiny("bert"), backend="eager"), args=args)


@pytest.mark.parametrize("kind", ["delta", "subnetwork"])
def test_hooks_registered_before_convert_keep_running_and_keep_their_handles(kind):
    """PEFT keeps a layer's hooks running (it wraps the layer); a replaced module dropped them."""
    model = tiny("bert").eval()
    name = "bert.encoder.layer.0.attention.self.query"
    seen = []
    linear = model.get_submodule(name)
    handles = [linear.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
               linear.register_forward_hook(lambda m, args, out: seen.append(("post", type(m).__name__))),
               linear.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", type(m).__name__)))]
    extra = {"density": 0.1} if kind == "delta" else {
        "masks": {"de": {f"{name}.weight": torch.ones_like(linear.weight, dtype=torch.bool)}}}
    hf.convert(model, [name], kind=kind, **extra)
    layer = model.get_submodule(name)
    ids = batch(2, 5)
    with hf.route(model, [0, 0]) if kind == "subnetwork" else contextlib.nullcontext():
        model(input_ids=ids, labels=ids).loss.backward()
    kinds = [k for k, _ in seen]
    assert kinds == ["pre", "post", "backward"] and {t for _, t in seen} == {type(layer).__name__}
    seen.clear()
    plain = hf.merge_and_unload(model).get_submodule(name)  # back to nn.Linear, hooks included
    model(input_ids=ids)
    assert [k for k, _ in seen] == ["pre", "post"] and {t for _, t in seen} == {type(plain).__name__}
    for h in handles:  # the handles from before convert still remove them
        h.remove()
    seen.clear()
    model(input_ids=ids)
    assert seen == []


def test_an_empty_target_list_is_refused_and_changes_nothing():
    # convert(target_modules=[]) converted nothing and froze every parameter
    model = tiny("bert")
    with pytest.raises(ValueError, match="target_modules is empty"):
        hf.convert(model, [], density=0.1)
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "xlsparse_config")


@pytest.mark.parametrize("against", ["plain", "converted"])
def test_from_models_on_converted_gpt2_gives_the_models_own_conv1d_layout(against):
    # A converted Conv1D layer stores its [in, out] weight as [out, in]: from_models ranked and stored
    # that layout under the model's own name, so a square weight's diff landed transposed on the base.
    base, x = tiny("gpt2"), batch(2)
    name = "transformer.h.0.attn.c_proj.weight"  # square: no shape check can catch a transpose
    masks = {"de": {name: torch.ones(base.get_parameter(name).shape, dtype=torch.bool)}}
    model = hf.convert(copy.deepcopy(base), target_modules=["attn.c_proj"], kind="subnetwork", masks=masks)
    theta0 = base if against == "plain" else copy.deepcopy(model)
    state = model.state_dict()  # the model's own layout
    w = state[name].clone()
    w[1, 0] += 1.0  # input 1, output 0
    model.load_state_dict({**state, name: w})
    diff = SparseDiff.from_models(theta0, model, k=1)
    assert diff.deltas[name].indices.tolist() == [1 * 32 + 0]
    plain = copy.deepcopy(base)
    diff.apply(plain)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)
