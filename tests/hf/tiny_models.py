"""Tiny Hugging Face models built from configs (nothing is downloaded), and helpers shared by tests/hf."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 97


def tiny(arch: str, seed: int = 0):
    """A tiny randomly initialised causal- or masked-LM of the given architecture, in eval mode."""
    torch.manual_seed(seed)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=32)
        model = transformers.BertForMaskedLM(cfg)
    elif arch == "xlmr":
        cfg = transformers.XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=48, max_position_embeddings=40, pad_token_id=1)
        model = transformers.XLMRobertaForMaskedLM(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "xglm":  # X-ELM's base; its embedding scales its output by sqrt(d_model)
        cfg = transformers.XGLMConfig(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=2, ffn_dim=48,
                                      max_position_embeddings=32)
        model = transformers.XGLMForCausalLM(cfg)
    # families with shared or factorised parameters (no dropout: their outputs are compared across runs)
    elif arch == "albert":  # one layer's modules run at every depth; embeddings factorised 16 -> 32
        cfg = transformers.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                        num_hidden_groups=1, num_attention_heads=2, intermediate_size=48,
                                        max_position_embeddings=32)
        model = transformers.AlbertForMaskedLM(cfg)
    elif arch == "distilbert":  # vocab_projector tied to the word embeddings
        cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                            max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
        model = transformers.DistilBertForMaskedLM(cfg)
    elif arch == "opt":  # word_embed_proj_dim != hidden_size: project_in / project_out
        cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                                     num_attention_heads=2, ffn_dim=48, max_position_embeddings=32, dropout=0.0,
                                     attention_dropout=0.0)
        model = transformers.OPTForCausalLM(cfg)
    elif arch == "t5":  # `shared` is the encoder's and decoder's embed_tokens and the (scaled) lm_head
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                                    decoder_start_token_id=0, dropout_rate=0.0)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ["bert", "xlmr", "llama", "gpt2"]
SHARED_ARCHS = ["albert", "distilbert", "opt", "t5"]  # not in ARCHS: tests of their own


def batch(b: int = 3, s: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, s), generator=g)


def random_diff(model, nnz: int, scale: float, seed: int):
    """A SparseDiff with `nnz` random entries on every block linear weight of an unconverted model."""
    import xlsparse
    from xlsparse import hf

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in hf.model.target_names(model):
        w = model.get_submodule(name).weight
        idx = torch.randperm(w.numel(), generator=g)[:nnz].sort().values
        deltas[f"{name}.weight"] = xlsparse.SparseDelta(idx, torch.randn(nnz, generator=g) * scale, w.shape)
    return xlsparse.SparseDiff(deltas)


# What asks a trainer to run under a framework that replaces the model's parameters or its
# optimizer when train() wraps it (the xlsparse trainers refuse them all at construction)
SHARDING = ["fsdp", "deepspeed", "deepspeed_plugin", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"]


def ask_for_sharding(monkeypatch, args, how: str):
    """`args` (TrainingArguments) asking for `how`, as a user would: a TrainingArguments field
    (set after construction: deepspeed need not be installed) or what `accelerate launch` sets.
    `deepspeed_plugin` is what TrainingArguments makes of ACCELERATE_USE_DEEPSPEED=1 (or any
    other value its strtobool takes, where the Accelerator itself reads "true" only)."""
    if how == "fsdp":
        args.fsdp = True
    elif how == "deepspeed":
        args.deepspeed = {"zero_optimization": {"stage": 2}}
    elif how == "deepspeed_plugin":
        args.deepspeed_plugin = "DeepSpeedPlugin()"
    else:
        monkeypatch.setenv(how, "true")
    return args
