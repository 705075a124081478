"""Cross-lingual expert language models (X-ELM, Blevins et al. 2024) as sparse experts over one
shared base, run together in one batched pass and mixed per token.

What follows the paper (and its c-BTM lineage, Gururangan et al. 2023):
  - independent experts, each trained on the languages of one cluster; clusters come from
    typology (X-ELM's own: greedy pairing by lang2vec syntax distance, `cluster_languages`) or
    from balanced k-means over example embeddings (c-BTM's data clustering, `balanced_kmeans`);
  - a new expert is branched from the typologically closest existing one (X-ELM's
    "hierarchical multi-round training") and leaves the others untouched.
How the experts are weighted: X-ELM's code (after c-BTM) weights them by a tf-idf classifier of
the context, softmax(−d²/T) of its distances to k-means centres of the training clusters (T = 0.1
and one weight vector per prefix in its perplexity evaluation, which mixes probabilities, its
optional top-k applied to those weights; T = 1 and one per example in its downstream evaluation,
which mixes logits). xlsparse has no tf-idf classifier: give such weights per position [B, S, E]
or per example [B, E] with weighting="static" (space="logit" for the downstream mixing), truncated
to the top k where wanted (`top_k` ranks the posterior only). The default,
weighting="posterior", is BTM's Bayes rule (Li et al. 2022), not X-ELM's:
p(e | x<t) ∝ p(e) · p(x<t | e) over the whole prefix, with the prior p(e) uniform unless given, so
the first token uses the prior, and optionally only the top-k experts. (The 'bayes' option of
X-ELM's code differs again: it weights by p(e) · p_e(x_t | x<t), the last token's likelihood only.)
What is xlsparse's own:
  - experts are sparse diffs (plus dense or sparse embedding and head parts), not separate
    dense models: all E experts run as E copies of the batch through `MultiDeltaLinear`
    (one gated multi-delta matmul per layer), with `ExpertEmbedding` for the input embedding;
  - the posterior temperature: log w_e = log p(e) + log p(x<t | e) / temperature;
  - a token that leaves no expert possible (probability 0 under every expert still weighted) is
    skipped by the posterior, where Bayes' rule is 0/0 (`_grown`); its NLL stays inf;
  - `typological_prior`, a prior over experts from X-ELM's typological distance (the one
    `closest_parent` ranks by), softmax(−d/T);
  - a child expert may grow its support beyond its parent's by the largest gradient
    magnitudes on its first batch (`train_expert(..., init=parent, grow=k)`);
  - both mixings on every weighting: probability space (`space="prob"`) or logit space
    (`space="logit"`, log_softmax(Σ_e w_e z_e)).
"""
import copy
import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..diff import SparseDelta, SparseDiff, index_dtype
from ..functional import ensemble_logprobs, ensemble_nll, topk_mask
from ..nn import ExpertEmbedding, SparseDeltaLinear
from ..ops import checks
from ..optim import MaskedAdamW, decay_the_base_
from .model import (_fingerprint, _refuse_liger_on_converted_head, _refuse_max_norm, _uncompiled, accepts_compiled,
                    convert, extract_diff, route, target_names, train_outside_diff)
from .subnetworks import _check_batches, _check_language_batches, _progress

WEIGHTINGS = ("posterior", "uniform", "static")


# --- experts ---

def _named_module(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("ExpertEnsemble: the module is not part of the model")


def _as_delta(t: torch.Tensor) -> SparseDelta:
    """A dense difference as a SparseDelta over its nonzero entries (exact, for MultiDeltaLinear)."""
    idx = t.reshape(-1).nonzero().squeeze(1)
    return SparseDelta._trusted(idx.to(index_dtype(t.numel())), t.reshape(-1)[idx], t.shape)


def _split_expert(name: str, diff: SparseDiff, params: dict, linears: set, embedding: str, head: str | None,
                  tied: bool) -> tuple[dict, object]:
    """An expert's entries as ({linear weight name: SparseDelta}, embedding delta or None).

    Dense entries and absolute ones (as value − base) are kept exactly; an entry on a parameter
    the ensemble cannot route raises instead of being dropped.
    """
    both = sorted(set(diff.deltas) & set(diff.dense))
    if both:  # the dense entry would replace the delta (a diff built unchecked, SparseDiff._trusted)
        raise ValueError(f"ExpertEnsemble: expert {name!r} has both a sparse and a dense entry for {both}")
    entries = dict(diff.deltas)
    entries.update(diff.dense)
    for pname, value in diff.absolute.items():
        if pname not in params:
            raise ValueError(f"ExpertEnsemble: expert {name!r} has an absolute entry for {pname!r}, not a model parameter")
        entries[pname] = value.to(params[pname]) - params[pname].detach()
    values = {p: d if isinstance(d, torch.Tensor) else d.values for p, d in entries.items()}
    nonfinite = [p for p, v in values.items() if not bool(torch.isfinite(v).all())]
    if nonfinite:  # one NaN turned every token's mixture -inf, the other experts' included
        raise ValueError(f"ExpertEnsemble: expert {name!r} has NaN or inf values in {nonfinite[:3]} (a diverged run?)")
    if tied and head in entries:
        raise ValueError(f"ExpertEnsemble: expert {name!r} changes {head!r}, which is tied to the input embedding; "
                         f"give that delta under {embedding!r} (it changes both)")
    supported = linears | {embedding} | ({head} if head else set())
    unsupported = [p for p in entries if p not in supported]
    if unsupported:
        raise ValueError(f"ExpertEnsemble: expert {name!r} changes {unsupported[:5]}, which the ensemble cannot route "
                         f"per expert; it routes the target linear layers, the input embedding {embedding!r}"
                         f"{'' if not head or tied else f' and the head {head!r}'} (pass target_modules to add linear layers)")
    linear, emb = {}, entries.get(embedding)
    for pname, d in entries.items():
        if pname == embedding:
            continue
        linear[pname] = _as_delta(d) if isinstance(d, torch.Tensor) else d
    if tied and emb is not None:  # one tied matrix: its delta also changes the output head
        linear[head] = _as_delta(emb) if isinstance(emb, torch.Tensor) else emb
    return linear, emb


def _no_state_dict(call: str) -> RuntimeError:
    return RuntimeError(f"ExpertEnsemble: {call} is not supported (a state dict lacks the experts and their "
                        "embedding deltas): save each expert with SparseDiff.save and build the ensemble from them "
                        "again")


class ExpertEnsemble(nn.Module):
    """E experts over one base, run as one batch of E copies and mixed per token. The base is a causal
    (decoder-only) LM: an encoder-decoder or a masked LM raises.

    `experts` {name: SparseDiff}: each may change the target linear layers (default: every linear
    layer of the blocks, plus the output head when an expert changes it), the input embedding and
    the head, with sparse, dense or absolute entries; anything else raises.
    `weighting`: "posterior" (per token, p(e | x<t) ∝ prior_e · p(x<t | e)^(1/temperature),
    the prior alone at the first token: BTM's rule, not X-ELM's tf-idf weights, see the module
    docstring), "uniform", or "static" (`weights` given to `forward`, per example [B, E] or per
    position [B, S, E], row t for the prediction of x_{t+1}: e.g. X-ELM's tf-idf cluster
    probabilities of each example or each prefix (X-ELM's perplexity scorer gives row t the
    classifier's weights of x<t, a token behind x≤t); else the prior), each row normalised to
    sum 1 (X-ELM's downstream mixing takes its weights as given; they sum to 1 there).
    `prior` (uniform by default):
    {expert name: weight} naming every expert (as `typological_prior` returns), or E weights in
    the order of `experts`; each must be positive and finite;
    `top_k` (posterior weighting only) keeps the k heaviest experts per token, and any tied with
    the k-th, and renormalises (the first token under a uniform prior keeps them all). `space`: mix
    probabilities ("prob", as X-ELM's perplexity evaluation) or logits ("logit", as its
    downstream evaluation).

    The experts are its saved form (`SparseDiff.save`): `state_dict` and `load_state_dict` raise.

    `ensemble(input_ids, attention_mask=None, weights=None)` returns [B, S, V]: at position t
    the mixture's log-probabilities of the token after x_≤t. `attention_mask` [B, S] holds 1 (real)
    and 0 (padding) with each row's real tokens in one run (padded on the left and/or right, as
    `_check_mask` requires; anything else raises): a padded row's real positions are scored as
    the row unpadded, and its padded positions hold values to ignore.
    """

    def __init__(self, base: nn.Module, experts: Mapping[str, SparseDiff], weighting: str = "posterior",
                 prior=None, top_k: int | None = None, temperature: float = 1.0, target_modules=None,
                 space: str = "prob"):
        super().__init__()
        if not isinstance(experts, Mapping) or not all(isinstance(d, SparseDiff) for d in experts.values()):
            raise TypeError(f"ExpertEnsemble: experts must be {{name: SparseDiff}}, got {type(experts).__name__} "
                            "(train_cluster_experts returns (experts, members): pass its first item)")
        if not experts:
            raise ValueError("ExpertEnsemble: give at least one expert")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"ExpertEnsemble: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if top_k is not None:  # True passed the range check as 1; 1.5 failed only in the first forward
            checks.count("ExpertEnsemble", "top_k", top_k)
        if top_k is not None and weighting != "posterior":  # static and uniform weights are not ranked per token
            raise ValueError(f"ExpertEnsemble: top_k is for weighting='posterior', not {weighting!r}")
        if not checks.is_real(temperature):  # "2" failed in the comparison below, unnamed; True was read as 1.0
            raise TypeError(f"ExpertEnsemble: temperature must be a number, got {temperature!r}")
        if not 0 < temperature < math.inf:  # inf: a −inf prefix log-likelihood / inf gave a NaN weight
            raise ValueError(f"ExpertEnsemble: temperature must be a finite number > 0, got {temperature}")
        if temperature != 1.0 and weighting != "posterior":  # it scales the prefix likelihoods only
            raise ValueError(f"ExpertEnsemble: temperature is for weighting='posterior', not {weighting!r}")
        if prior is not None and weighting == "uniform":
            raise ValueError("ExpertEnsemble: a prior is for weighting='posterior' or 'static', not 'uniform'")
        if space not in ("prob", "logit"):
            raise ValueError(f"ExpertEnsemble: space must be 'prob' or 'logit', got {space!r}")
        # the mixture reads row t of the logits as p(x_{t+1} | x<=t): an encoder-decoder given input_ids
        # alone, or a masked LM, sees the tokens it is scored on, and was mixed as if it did not
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False) or \
                (callable(getattr(base, "can_generate", None)) and not base.can_generate()):
            raise ValueError(f"ExpertEnsemble: the base ({type(base).__name__}) is no causal (decoder-only) language "
                             "model; the ensemble scores and generates next tokens from x<=t only")
        self._bases = [base]  # in a list, not a submodule: .to() of the ensemble leaves it alone
        # add_expert rebuilds every expert from the base: it must still be the one they were built on
        self._base_prints = self._base_fingerprints()
        self._target_modules = target_modules
        self.weighting, self.top_k, self.temperature, self.space = weighting, top_k, float(temperature), space
        self.experts: dict[str, SparseDiff] = dict(experts)
        self._prior = _own_prior(prior)
        self._build()

    def _build(self) -> None:
        """Build `model` and the prior from `experts`; nothing is assigned until all of it built."""
        e = len(self.experts)
        if self.top_k is not None and not 1 <= self.top_k <= e:
            raise ValueError(f"ExpertEnsemble: top_k must be in [1, {e}], got {self.top_k}")
        prior = torch.full((e,), 1.0 / e, dtype=torch.float64) if self._prior is None else \
            torch.as_tensor(self._prior_in_order(), dtype=torch.float64)
        # an infinite one normalised to NaN, and every log-probability of the mixture came out -inf
        if prior.shape != (e,) or not bool((prior > 0).all() and torch.isfinite(prior).all()):
            raise ValueError(f"ExpertEnsemble: prior must be {e} positive finite numbers, got {prior.tolist()}")
        # not a buffer: `.to(torch.bfloat16)` of the ensemble would round the prior too
        log_prior = (prior / prior.sum()).log().float()

        model = copy.deepcopy(self._bases[0])
        params = dict(model.named_parameters(remove_duplicate=False))
        emb_module, head_module = model.get_input_embeddings(), model.get_output_embeddings()
        embedding = _named_module(model, emb_module) + ".weight"
        head = None if head_module is None else _named_module(model, head_module) + ".weight"
        tied = head is not None and head_module.weight is emb_module.weight
        linears = set(f"{n}.weight" for n in target_names(model, self._target_modules))
        if head is not None:
            linears.discard(head)
        per_expert = [_split_expert(n, d, params, linears, embedding, head, tied)
                      for n, d in self.experts.items()]
        targets = sorted(linears)
        if head is not None and any(head in lin for lin, _ in per_expert):
            targets.append(head)
        diffs = {n: SparseDiff._trusted(lin) for n, (lin, _) in zip(self.experts, per_expert)}
        # A tied head gets the embedding's delta (`_split_expert`), so both uses change alike.
        model = convert(model, [t[: -len(".weight")] for t in targets], kind="multi", diffs=diffs,
                        keep_tied=[head[: -len(".weight")]] if tied and head in targets else [])
        embeddings = [emb for _, emb in per_expert]
        if any(emb is not None for emb in embeddings):
            model.set_input_embeddings(ExpertEmbedding(emb_module, embeddings))
        # For inference: a step taken here would never reach `experts`, and add_expert rebuilds from those.
        self.model = model.requires_grad_(False).eval()
        self._log_prior = log_prior

    def _prior_in_order(self) -> list:
        """The prior as a list in the experts' order: a Mapping is read by expert name, and must
        name each expert once (a prior keyed by other names would weigh experts it never meant)."""
        if not isinstance(self._prior, Mapping):
            return self._prior
        missing, extra = [n for n in self.experts if n not in self._prior], [n for n in self._prior if n not in self.experts]
        if missing or extra:
            raise ValueError(f"ExpertEnsemble: prior must name every expert once; it lacks {missing} and names "
                             f"{extra}, which are not experts")
        return [self._prior[n] for n in self.experts]

    def _base_fingerprints(self) -> dict:
        return {n: _fingerprint(p) for n, p in self._bases[0].named_parameters(remove_duplicate=False)}

    # The experts (which add_expert rebuilds from) and their embedding deltas are no part of a state
    # dict: a load gave another ensemble than the one saved (0.33 off), silently. Both ends raise,
    # also for an ensemble held as a submodule (its parent's calls reach these).
    def state_dict(self, *args, **kwargs):
        raise _no_state_dict("state_dict")

    def _load_from_state_dict(self, *args, **kwargs):  # runs before any submodule loads
        raise _no_state_dict("load_state_dict")

    @property
    def names(self) -> list[str]:
        """The experts' names, in the order of their ids."""
        return list(self.experts)

    def add_expert(self, name: str, diff: SparseDiff, prior: float | None = None) -> None:
        """Add an expert; the others are not changed. With a non-uniform prior, give the new
        expert's `prior` (the priors are renormalised). The ensemble is rebuilt from the base it
        was given: a base changed since (values, dtype or parameters) raises, and nothing changes."""
        if not isinstance(diff, SparseDiff):  # a bare AttributeError ('... has no attribute deltas') in the rebuild
            raise TypeError(f"add_expert: diff must be a SparseDiff, got {type(diff).__name__}")
        if name in self.experts:
            raise ValueError(f"add_expert: an expert named {name!r} exists")
        if (self._prior is None) != (prior is None):
            raise ValueError("add_expert: give prior= exactly when the ensemble has a non-uniform prior")
        if prior is not None:
            prior = checks.number("add_expert", "prior", prior)
        now = self._base_fingerprints()
        changed = [n for n in self._base_prints if now.get(n) != self._base_prints[n]] or \
            sorted(set(now) - set(self._base_prints))
        if changed:  # the rebuild would have run every other expert on the changed base, silently
            raise ValueError(f"add_expert: the base model changed after the ensemble was built ({changed[:3]}); "
                             "the ensemble rebuilds every expert from it: build a new ExpertEnsemble on the base "
                             "the experts were trained from")
        # the rebuild starts from the unconverted base: keep where and in what dtype the ensemble runs
        ref = next(self.model.parameters())
        before = dict(self.experts), self._prior
        self.experts[name] = diff
        if isinstance(self._prior, Mapping):
            self._prior = {**self._prior, name: prior}
        elif prior is not None:
            self._prior = [*self._prior, prior]
        try:
            self._build()
        except Exception:
            # an expert the ensemble cannot hold: without it again (it was listed, and its id was routed
            # to a model built without it)
            self.experts, self._prior = before
            raise
        self.to(device=ref.device, dtype=ref.dtype)

    # --- the pieces: expert logits, token log-likelihoods, weights ---

    def _copies(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The expert of each token of the E copies [E·B, S]: one id per token, not per copy, since a
        layer that sees the tokens flattened (OPT's feed-forward, [E·B·S, H]) cannot place a copy's id."""
        e, (b, s) = len(self.experts), input_ids.shape
        return torch.arange(e, device=input_ids.device).repeat_interleave(b)[:, None].expand(e * b, s)

    def expert_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[E, B, S, V]: every expert's logits, from one batched pass of E copies. With a mask (the
        class docstring's rule), positions count real tokens only (as HF's `generate` does), so a
        padded row is scored as the same row unpadded also by absolute-position models (GPT-2, XGLM)."""
        e, (b, s) = len(self.experts), input_ids.shape
        if attention_mask is not None:
            _check_mask(attention_mask, input_ids)
        return self._expert_pass(input_ids, attention_mask, use_cache=False).logits.reshape(e, b, s, -1)

    def _expert_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
        """The model's output on E copies of the batch, positions counted over real tokens only."""
        if self.model.training:  # the ensemble's own .train(), or a parent's: dropout would randomise every score
            raise RuntimeError("ExpertEnsemble: it is in training mode, where dropout randomises its scores; it is "
                               "for inference: call .eval() on it")
        e = len(self.experts)
        mask = positions = None
        if attention_mask is not None:
            mask = attention_mask.repeat(e, 1)
            positions = _positions(mask)
        with route(self.model, self._copies(input_ids)):
            return self.model(input_ids=input_ids.repeat(e, 1), attention_mask=mask, position_ids=positions, **kwargs)

    def _refuse_unused_weights(self, weights: torch.Tensor | None) -> None:
        if weights is not None and self.weighting != "static":
            raise ValueError(f"ExpertEnsemble: weights are used only with weighting='static', not {self.weighting!r}")

    def log_weights(self, token_logprobs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S, E] log mixture weights from the experts' log-likelihoods of each observed
        next token, `token_logprobs` [E, B, S−1] (log p_e(x_{t+1} | x_≤t), 0 where
        `_predicted` is 0). A token that leaves no expert possible leaves the posterior as it was
        (`_grown`)."""
        e, b, s1 = token_logprobs.shape
        s = s1 + 1
        self._refuse_unused_weights(weights)
        if self.weighting == "uniform":
            return torch.full((b, s, e), -torch.log(torch.tensor(float(e))).item(), device=token_logprobs.device)
        if self.weighting == "static":
            if weights is None:
                return self._log_prior.to(token_logprobs.device).expand(b, s, e).clone()
            # Per position as X-ELM's perplexity evaluation (c-BTM's scorer) weighs: a tf-idf
            # classifier of each prefix. Row t weighs the prediction of x_{t+1}.
            if tuple(weights.shape) not in ((b, e), (b, s, e)):
                raise ValueError(f"ExpertEnsemble: weights must have shape [{b}, {e}] (per example) or [{b}, {s}, {e}] "
                                 f"(per position), got {tuple(weights.shape)}")
            # a mixture: a negative weight gave more than probability 1, an all-zero row NaN
            if not bool(torch.isfinite(weights).all() and (weights >= 0).all() and (weights.sum(-1) > 0).all()):
                raise ValueError("ExpertEnsemble: weights must be finite and >= 0, with a positive sum in every row")
            # normalised in float64: in bf16 three equal weights became 0.3340 each, a mixture of mass 1.005
            weights = weights.double()
            # log 0 = −inf: an expert of weight 0 then adds nothing, even where its logits are ±inf
            # (clamped to 1e-30, 1e-30 · inf made the logit-space mixture inf, and a token only it
            # allowed got an NLL of 69 in probability space, not inf)
            log_w = (weights / weights.sum(-1, keepdim=True)).log().float()
            return (log_w[:, None, :].expand(b, s, e) if log_w.dim() == 2 else log_w).clone()
        return self._posterior(self._prefix_loglik(token_logprobs).permute(1, 2, 0))

    def _prefix_loglik(self, token_logprobs: torch.Tensor) -> torch.Tensor:
        """[E, B, S] log p_e(x_1 .. x_t) from `token_logprobs` [E, B, S−1] (nothing at t = 0), each
        token added by `_grown`'s rule."""
        e, b, s1 = token_logprobs.shape
        token_logprobs = token_logprobs.float()
        prefix = torch.zeros(e, b, s1 + 1, dtype=torch.float32, device=token_logprobs.device)
        prefix[:, :, 1:] = token_logprobs.cumsum(2)
        log_prior = self._log_prior.to(prefix.device)
        if bool(torch.isneginf(log_prior[:, None, None] + prefix).all(0).any()):  # a token of probability 0: rare
            for t in range(1, s1 + 1):
                prefix[:, :, t] = _grown(prefix[:, :, t - 1], token_logprobs[:, :, t - 1], log_prior)
        return prefix

    def _posterior(self, prefix_loglik: torch.Tensor) -> torch.Tensor:
        """log p(e | prefix) [..., E] from log p(prefix | e) [..., E]: prior, temperature, top-k."""
        scores = self._log_prior.to(prefix_loglik.device) + prefix_loglik / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            # Experts tied with the k-th stay: at the first token a uniform prior ties them all,
            # and keeping the first k by position would favour experts by their order.
            kth = scores.topk(self.top_k, -1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        return torch.log_softmax(scores, -1)

    def _token_logprobs(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """[E, B, S−1]: each expert's log p_e(x_{t+1} | x_≤t), 0 where `_predicted` is 0."""
        e, b, s, v = logits.shape
        lp = torch.log_softmax(logits[:, :, :-1].float(), -1).gather(
            -1, input_ids[None, :, 1:, None].expand(e, b, s - 1, 1)).squeeze(-1)
        # where, not a product: a −inf log-probability at a padded position (a logit processor's
        # ban, an fp16 overflow) times 0 was NaN, which then spoiled the row's posterior
        return lp if attention_mask is None else torch.where(_predicted(attention_mask)[None].bool(), lp, 0.0)

    def _parts(self, input_ids, attention_mask, weights):
        logits = self.expert_logits(input_ids, attention_mask)
        return logits, self.log_weights(self._token_logprobs(logits, input_ids, attention_mask), weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        logits, log_w = self._parts(input_ids, attention_mask, weights)
        e, b, s, v = logits.shape
        # log_w stays float32 beside bf16 logits: rounded to bf16, 3 uniform weights summed to 0.997
        out = ensemble_logprobs(logits.reshape(e, b * s, v), log_w.reshape(b * s, e), space=self.space)
        return out.reshape(b, s, v)

    def token_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S−1]: −log p(x_{t+1} | x_≤t) under the mixture (fused: no [T, V] output). With an
        `attention_mask`, only predictions whose token and context token are both real count
        (`ensemble_perplexity` averages those); the others hold values to ignore."""
        logits, log_w = self._parts(input_ids, attention_mask, weights)
        e, b, s, v = logits.shape
        lg = logits[:, :, :-1].reshape(e, b * (s - 1), v)
        lw = log_w[:, :-1].reshape(b * (s - 1), e)
        return ensemble_nll(lg.contiguous(), lw.contiguous(), input_ids[:, 1:].reshape(-1), space=self.space).reshape(b, s - 1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 generator: torch.Generator | None = None, eos_token_id: int | None = None,
                 weights: torch.Tensor | None = None, return_logprobs: bool = False,
                 attention_mask: torch.Tensor | None = None):
        """Generate through the mixture, greedily or by sampling (`do_sample`, `generator`).

        Incremental: the experts keep a KV cache, and each expert's prefix log-likelihood grows
        by one token per step, so no prefix is scored twice. Padded prompts need their
        `attention_mask` [B, S] (1 real, 0 padding) and left padding, as HF's `generate`: a row
        then continues as it would unpadded. Returns the ids [B, S + new] (stopping early when
        every row has produced `eos_token_id`), and with `return_logprobs` also the mixture's
        log-probabilities [B, new, V] at each step.
        """
        # 2.5 ran the prompt through every expert, then failed in range() naming no argument
        if checks.count("generate", "max_new_tokens", max_new_tokens) < 1:
            raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
        # do_sample="no" is truthy: it sampled; eos_token_id=True stopped at token 1
        checks.flag("generate", "do_sample", do_sample)
        checks.flag("generate", "return_logprobs", return_logprobs)
        if eos_token_id is not None:
            checks.count("generate", "eos_token_id", eos_token_id)
        if weights is not None and weights.dim() == 3:  # the new tokens' positions would have none
            raise ValueError("generate: weights per position cover the prompt only; give weights per example [B, E]")
        if attention_mask is not None:
            _check_mask(attention_mask, input_ids)
            # the next token is predicted from each row's last position: padding there would continue padding
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("generate: attention_mask must have every row's last token real "
                                 "(pad prompts on the left)")
        e, b = len(self.experts), input_ids.shape[0]
        copies = self._copies(input_ids[:, -1:])  # each step runs one token per copy
        out = self._expert_pass(input_ids, attention_mask, use_cache=True)
        logits = out.logits.reshape(e, b, input_ids.shape[1], -1)
        if eos_token_id is not None and not 0 <= eos_token_id < logits.shape[-1]:  # no token is it: it never stopped
            raise ValueError(f"generate: eos_token_id must be a token id in [0, {logits.shape[-1]}), got {eos_token_id}")
        token_lp = self._token_logprobs(logits, input_ids, attention_mask)
        posterior = self.weighting == "posterior"
        if posterior:  # the prompt's prefix scan once, grown by one token per step below
            self._refuse_unused_weights(weights)
            prefix = self._prefix_loglik(token_lp)[:, :, -1]  # [E, B]: log p_e(prompt)
        else:
            static_w = self.log_weights(token_lp, weights)[:, -1]  # [B, E]
        cache, step_logits = _cache_of(out), logits[:, :, -1]
        cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        ids, scores, done = input_ids, [], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        mask, step_args = attention_mask, {}
        for _ in range(max_new_tokens):
            lw = self._posterior(prefix.T) if posterior else static_w
            mixed = ensemble_logprobs(step_logits, lw, space=self.space)  # [B, V]; lw float32, as in forward
            scores.append(mixed)
            if do_sample:
                token = torch.multinomial(mixed.float().exp(), 1, generator=generator).squeeze(1)
            else:
                token = mixed.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done = done | (token == eos_token_id)
            ids = torch.cat([ids, token[:, None]], 1)
            if len(scores) == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            if posterior:
                step_lp = torch.log_softmax(step_logits.float(), -1).gather(-1, token[None, :, None].expand(e, b, 1))
                prefix = _grown(prefix, step_lp.squeeze(-1), self._log_prior.to(prefix.device))
            if mask is not None:  # the new token's position, by the prompt's rule
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                step_args = {"attention_mask": mask.repeat(e, 1), "position_ids": _positions(mask)[:, -1:].repeat(e, 1)}
            with route(self.model, copies):
                out = self.model(input_ids=token.repeat(e)[:, None], use_cache=True, **{cache_arg: cache}, **step_args)
            cache, step_logits = _cache_of(out), out.logits[:, -1].reshape(e, b, -1)
        return (ids, torch.stack(scores, 1)) if return_logprobs else ids


def _check_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """The ensemble's rule for an `attention_mask`: [B, S] as `input_ids`, 1 (real) and 0 (padding)
    only, and each row's real tokens in one run, padded on the left and/or right. Other values
    gave wrong positions (a mask of 2s scored GPT-2 at twice its positions), and a prediction
    across a hole in a row is none that `_predicted` counts (the row was scored without it)."""
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"ExpertEnsemble: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("ExpertEnsemble: attention_mask must hold 0 (padding) and 1 (real token) only")
    m = attention_mask.long()
    runs = m[:, 0] + (m[:, 1:] > m[:, :-1]).sum(-1)  # the starts of runs of real tokens, per row
    if bool((runs > 1).any()):
        rows = (runs > 1).nonzero().squeeze(1).tolist()
        raise ValueError("ExpertEnsemble: attention_mask must have each row's real tokens in one run (padding on the "
                         f"left or right only); rows {rows} have padding between real tokens")


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] position ids that count real tokens only (as HF's `generate` does): a padded row gets
    the positions it would have unpadded (padding takes 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _own_prior(prior):
    """The prior as numbers of the ensemble's own ({name: float} or [float]): add_expert's rebuild
    read a caller's tensor changed in place since, or a generator the first build had used up."""
    if prior is None:
        return None
    # each weight a number: float() read "0.5" as 0.5 and True as 1.0, and "abc" failed naming nothing
    if isinstance(prior, Mapping):
        return {n: checks.number("ExpertEnsemble", f"prior[{n!r}]", w) for n, w in prior.items()}
    if isinstance(prior, torch.Tensor):
        prior = prior.tolist()
    if isinstance(prior, str) or not isinstance(prior, Iterable):
        raise TypeError(f"ExpertEnsemble: prior must be {{expert name: weight}} or a list of weights, got {prior!r}")
    return [checks.number("ExpertEnsemble", f"prior[{i}]", w) for i, w in enumerate(prior)]


def _predicted(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, S−1]: 1 where x_{t+1} is a prediction that counts, both it and its context token x_t
    real. Under left padding "the first real token given only padding" is no prediction of the
    unpadded text, so it enters neither the posterior nor the perplexity."""
    return attention_mask[:, :-1] * attention_mask[:, 1:]


def _grown(prefix: torch.Tensor, token_logprobs: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """The experts' prefix log-likelihoods [E, B] after one more observed token, unless that token
    leaves no expert possible (p(e) · p(x≤t | e) = 0 for every e): Bayes' rule is 0/0 there, and
    the −inf prefixes made every later posterior NaN, the whole rest of the row. The posterior
    then stays as it was; the mixture gives the token probability 0, so its NLL, and the
    perplexity, are inf."""
    grown = prefix + token_logprobs
    ruled_out = torch.isneginf(log_prior[:, None] + grown).all(0)
    return torch.where(ruled_out, prefix, grown)


def _cache_of(out):
    """The KV cache of a model output (transformers 5 names it `cache`, 4 `past_key_values`)."""
    return out["cache"] if "cache" in out else out.past_key_values


@torch.no_grad()
def ensemble_perplexity(ensemble: ExpertEnsemble, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        weights: torch.Tensor | None = None) -> float:
    """exp of the mean negative log-likelihood of every next token under the ensemble's mixture,
    computed with `ensemble_nll`; with a mask, over the predictions whose token and context token
    are both real (a left- or right-padded row counts as the same row unpadded). The first token
    is context only, as in c-BTM's scorer; a token the mixture gives probability 0 makes the
    perplexity inf, where that scorer drops it from the mean (with a log line). A batch without
    such a prediction (no row with two real tokens) raises."""
    # Summed and counted in float64: in a bf16 ensemble's dtype, a sum of thousands of nats
    # and a count above 256 were rounded to 8 bits of mantissa.
    nll = ensemble.token_nll(input_ids, attention_mask, weights).double()
    mask = torch.ones_like(nll) if attention_mask is None else _predicted(attention_mask).to(nll.dtype)
    if not bool(mask.sum() > 0):  # the mean of nothing came back as perplexity 1.0, a perfect score
        raise ValueError("ensemble_perplexity: input_ids (with attention_mask) hold no prediction to score; a row "
                         "needs two real tokens")
    # where, not a product: an inf or NaN NLL at a padded position (a banned token there) times 0 was NaN
    return float(torch.exp(torch.where(mask.bool(), nll, 0.0).sum() / mask.sum()))


# --- which expert trains on which language ---

def _balanced_assignment(cost: torch.Tensor, floor: int, cap: int, start: torch.Tensor) -> torch.Tensor:
    """The assignment of N points to K clusters of `floor` to `cap` points each that minimises the
    summed `cost` [N, K] (a transportation problem), by cycle cancelling from the feasible `start`:
    while some cycle of moves lowers the sum, make it. A move of a point from cluster u to v costs
    cost[q, v] − cost[q, u] (the cheapest such point per pair); a node S closes the paths that
    take a point from a cluster above `floor` to one below `cap`. With no negative cycle left the
    assignment is optimal: the one c-BTM's auction solver (`kmeans_pytorch`, balanced=True)
    approximates, to within its ε, for equal clusters (K divides N; with another N it never ends)."""
    n, k = cost.shape
    assign = start.clone()
    rows = torch.arange(n)
    tol = 1e-12 * (1.0 + float(cost.abs().max()))
    while True:
        move = cost - cost[rows, assign][:, None]  # [N, K]: moving point q to cluster v
        w = torch.full((k + 1, k + 1), math.inf, dtype=cost.dtype)
        w[:k, :k] = w[:k, :k].scatter_reduce(0, assign[:, None].expand(n, k), move, "amin")
        w[:k, :k].fill_diagonal_(math.inf)
        counts = torch.bincount(assign, minlength=k)
        w[:k, k] = torch.where(counts < cap, 0.0, math.inf)  # v gains a point with nothing leaving: room
        w[k, :k] = torch.where(counts > floor, 0.0, math.inf)  # u loses a point with nothing coming in
        # Bellman-Ford from every node at once; a relaxation in pass k + 1 lies on or after a negative cycle
        dist, pred = torch.zeros(k + 1, dtype=cost.dtype), torch.full((k + 1,), -1, dtype=torch.long)
        changed = -1
        for _ in range(k + 1):
            via = dist[:, None] + w  # via[u, v]: reach v through u
            best, arg = via.min(0)
            better = best < dist - tol
            if not bool(better.any()):
                changed = -1
                break
            dist, pred = torch.where(better, best, dist), torch.where(better, arg, pred)
            changed = int(better.nonzero()[0])
        if changed < 0:
            return assign
        node = changed
        for _ in range(k + 1):  # walk back into the cycle
            node = int(pred[node])
        cycle, v = [node], int(pred[node])
        while v != node and len(cycle) <= k + 1:
            cycle.append(v)
            v = int(pred[v])
        cycle.reverse()  # edges cycle[i] -> cycle[i + 1]
        edges = list(zip(cycle, cycle[1:] + cycle[:1]))
        if v != node or not sum(float(w[u, v]) for u, v in edges) < -tol:
            return assign  # rounding, not a cycle that lowers the cost: optimal to within tol
        new = assign.clone()
        for u, v in edges:
            if u < k and v < k:  # a point moves from u to v: the cheapest, as w counted it
                members = (assign == u).nonzero().squeeze(1)
                new[members[move[members, v].argmin()]] = v
        assign = new


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means of example embeddings, as c-BTM clusters them (`kmeans_pytorch` with
    balanced=True): the `k` clusters are equal, N / k points each, or where k does not divide N
    (which c-BTM's solver does not handle) N // k or ceil(N / k). Returns (assignment [N],
    centres [k, D]).

    Each round gives the points the balanced assignment of least total squared distance to the
    centres (exactly, where c-BTM's auction solver approximates it; `_balanced_assignment`), then
    moves the centres to their points' means. The centres start at k distinct points of `x` (fewer
    than k distinct points raise). c-BTM clusters tf-idf vectors reduced by SVD and L2-normalised,
    which the caller provides.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    n = x.shape[0]
    k, iters = checks.count("balanced_kmeans", "k", k), checks.count("balanced_kmeans", "iters", iters)
    if iters < 1:  # no round ran: every point came back in cluster -1
        raise ValueError(f"balanced_kmeans: iters must be at least 1, got {iters}")
    if not bool(torch.isfinite(x).all()):  # a NaN distance went to whichever cluster the sort put first
        raise ValueError("balanced_kmeans: x holds NaN or inf")
    if not 1 <= k <= n:
        raise ValueError(f"balanced_kmeans: k must be in [1, {n}], got {k}")
    floor, cap = n // k, -(-n // k)
    # Start from k distinct points: two equal starting centres split their points by position, the
    # second got none, and its centre became the mean of nothing (NaN) for good.
    rows, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((rows.shape[0],), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")
    distinct = first.sort().values  # the first copy of each distinct point, in x's order
    if distinct.numel() < k:
        raise ValueError(f"balanced_kmeans: k={k} clusters need at least {k} distinct points, x has {distinct.numel()}")
    g = torch.Generator().manual_seed(seed)
    centres = x[distinct[torch.randperm(distinct.numel(), generator=g)[:k]]].clone()
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        cost = torch.cdist(x, centres).square()
        # a feasible start for the exact step: points in turn, the most decided first (largest gap
        # between nearest and farthest centre), each to its nearest centre with room, where only
        # N mod k clusters may grow past N // k
        order = torch.argsort(cost.max(1).values - cost.min(1).values, descending=True, stable=True)
        counts, big = [0] * k, n - floor * k
        start = torch.empty(n, dtype=torch.long)
        for i in order.tolist():
            for c in torch.argsort(cost[i], stable=True).tolist():
                if counts[c] < floor or (counts[c] == floor and big):
                    if counts[c] == floor:
                        big -= 1
                    start[i], counts[c] = c, counts[c] + 1
                    break
        new = _balanced_assignment(cost, floor, cap, start)
        if torch.equal(new, assign):
            break
        assign = new
        centres = torch.stack([x[assign == c].mean(0) for c in range(k)])  # none empty: floor >= 1
    return assign, centres.float()


def _syntax_average(codes: Sequence[str], what: str = "cluster_languages", minimal: bool = True) -> torch.Tensor:
    """[L, F] lang2vec `syntax_average` features, NaN where a language's value is missing ('--'),
    as X-ELM's clustering reads them; `minimal`: only the features that vary over `codes` (X-ELM's
    clustering), else all of them."""
    from .continual import _lang2vec, _refuse_unknown_uriel_codes

    l2v = _lang2vec()
    _refuse_unknown_uriel_codes(l2v, codes, "syntax_average", what)
    table = l2v.get_features(list(dict.fromkeys(codes)), "syntax_average", minimal=minimal)
    v = torch.tensor([[math.nan if x == "--" else float(x) for x in table[c]] for c in codes], dtype=torch.float64)
    # No known nonzero feature: a zero norm, NaN distances, and a clustering by NaN comparisons.
    blank = [c for c, row in zip(codes, v.nan_to_num(0.0)) if not bool(row.any())]
    if blank:
        raise ValueError(f"{what}: codes {blank} have no known nonzero lang2vec syntax_average feature "
                         "(among the features that vary over these languages); give clusters= instead")
    return v


def _cosine_distances(v: torch.Tensor) -> torch.Tensor:
    """[L, L] 1 − cosine between rows that skip missing values as X-ELM's code does: the dot over
    the features both rows have, each norm over the row's own known features."""
    known = ~v.isnan()
    x = torch.where(known, v, torch.zeros((), dtype=v.dtype))
    norms = x.square().sum(1).sqrt()
    return 1 - (x @ x.T) / (norms[:, None] * norms[None, :])


def cluster_languages(codes: Mapping[str, str], num_experts: int) -> dict[str, int]:
    """{language: expert index}: X-ELM's typological clustering (its `lang_clustering.py`).

    Each language is a lang2vec `syntax_average` vector; the distance of two clusters is the
    smallest cosine distance between their languages (missing features skipped). Starting from
    one cluster per language, each round pairs the clusters greedily, the closest pair first
    among those not paired yet, and merges each pair, until `num_experts` clusters remain. X-ELM
    halves the count each round (16 languages → 8 → 4 ...); when `len(codes) / num_experts` is
    not a power of two, the last round merges only as many pairs as needed, and a cluster left
    unpaired in a round (an odd count) carries over, where X-ELM's code would lose it.
    Ties go to the earlier pair in language order. `codes` maps each language to its ISO 639-3
    code; expert indices follow the order in which the clusters were formed, as there.
    """
    langs = list(codes)
    # 1.5 passed the range check and merged down to one cluster; True read as 1
    if not 1 <= checks.count("cluster_languages", "num_experts", num_experts) <= len(langs):
        raise ValueError(f"cluster_languages: num_experts must be in [1, {len(langs)}], got {num_experts}")
    dist = _cosine_distances(_syntax_average([codes[lang] for lang in langs]))
    clusters = [[i] for i in range(len(langs))]
    while len(clusters) > num_experts:
        pairs = sorted(((float(dist[clusters[a]][:, clusters[b]].min()), a, b)
                        for a in range(len(clusters)) for b in range(a + 1, len(clusters))), key=lambda t: t[0])
        merged, used = [], set()
        for _, a, b in pairs:
            if len(merged) == len(clusters) - num_experts:
                break
            if a not in used and b not in used:
                merged.append(clusters[a] + clusters[b])
                used.update((a, b))
        clusters = merged + [c for i, c in enumerate(clusters) if i not in used]
    return {langs[i]: e for e, members in enumerate(clusters) for i in members}


@accepts_compiled
def train_cluster_experts(base: nn.Module, batches: Mapping[str, Sequence], num_experts: int,
                          codes: Mapping[str, str] | None = None, clusters: Mapping[str, int] | None = None,
                          **train_kwargs) -> tuple[dict[str, SparseDiff], dict[str, list[str]]]:
    """X-ELM's branch-train step: cluster the languages, then train one expert per cluster on
    the batches of its languages, each once, spread evenly: language l's j-th of n_l batches at
    (j + ½)/n_l of the run (ties in the order of `batches`). So every language runs through the
    whole run in proportion to its data, as X-ELM's shuffle of its cluster's documents gives in
    expectation (a round-robin left the largest language alone at the end: en, sw, en, sw, en, en,
    en, en for 6 and 2 batches).

    `batches` {language: list of batches}, none empty; the clusters come from `codes` ({language: ISO
    639-3}, typological, via `cluster_languages`) or are given as `clusters` ({language:
    expert index in [0, num_experts)}, e.g. from `balanced_kmeans` over example embeddings).
    `train_kwargs` go to `train_expert`. Returns ({expert name: SparseDiff}, {expert name: its languages}).
    """
    if (codes is None) == (clusters is None):
        raise ValueError("train_cluster_experts: give exactly one of codes (URIEL clustering) or clusters")
    checks.count("train_cluster_experts", "num_experts", num_experts)  # 2.5 failed in range(), unnamed
    _check_language_batches("train_cluster_experts", batches)
    batches = {lang: list(b) for lang, b in batches.items()}
    empty = [lang for lang, b in batches.items() if not b]
    if empty:  # its expert trained without it, yet listed it among its members (and its typology placed the clusters)
        raise ValueError(f"train_cluster_experts: batches for {empty} are empty; an expert would list them among its "
                         "languages without training on them: drop them or give them batches")
    if sum(train_kwargs.get(key) is not None for key in ("k", "density", "init")) != 1:
        raise ValueError("train_cluster_experts: each expert needs a support: pass exactly one of k= (entries), "
                         "density= or init= (they go to train_expert); num_experts is the number of experts")
    if clusters is None:
        clusters = cluster_languages({lang: codes[lang] for lang in batches}, num_experts)
    missing = [lang for lang in batches if lang not in clusters]
    if missing:
        raise ValueError(f"train_cluster_experts: no cluster for languages {missing}")
    outside = {lang: clusters[lang] for lang in batches if not 0 <= clusters[lang] < num_experts}
    if outside:  # the expert loop below would never train on them
        raise ValueError(f"train_cluster_experts: clusters gives languages {outside} an expert index outside "
                         f"[0, {num_experts}) (num_experts={num_experts})")
    members = {f"expert{e}": [lang for lang in batches if clusters[lang] == e] for e in range(num_experts)}
    experts = {}
    for name, langs in members.items():
        if not langs:
            raise ValueError(f"train_cluster_experts: {name} has no language")
        queues = [batches[lang] for lang in langs]
        spread = sorted(((j + 0.5) / len(q), i, j) for i, q in enumerate(queues) for j in range(len(q)))
        experts[name] = train_expert(base, [queues[i][j] for _, i, j in spread], **train_kwargs)
    return experts, members


def _typological_distances(languages: Mapping[str, str | Sequence[str]], code: str, what: str) -> dict[str, float]:
    """{expert: X-ELM's typological distance of `code` to it}: the smallest lang2vec
    `syntax_average` cosine distance (missing features skipped, `_cosine_distances`) to any of the
    expert's languages, the cluster distance of X-ELM's `lang_clustering.py` (`cluster_languages`),
    over all features: X-ELM's `minimal` set, the features that vary over the languages read, made
    a pair's distance depend on the other experts listed (it, to e0: 0.20 with four experts, 0.37
    with two, and cs, ca, tl changed parent). `languages` = {expert: ISO 639-3 code or codes}."""
    if not languages:
        raise ValueError(f"{what}: no experts")
    members = {e: [c] if isinstance(c, str) else list(c) for e, c in languages.items()}
    empty = [e for e, cs in members.items() if not cs]
    if empty:
        raise ValueError(f"{what}: experts {empty} have no language")
    codes = [code, *dict.fromkeys(c for cs in members.values() for c in cs)]
    dist = dict(zip(codes, _cosine_distances(_syntax_average(codes, what, minimal=False))[0].tolist()))
    return {e: min(dist[c] for c in cs) for e, cs in members.items()}


def typological_prior(code: str, expert_codes: Mapping[str, str | Sequence[str]],
                      temperature: float = 0.1) -> dict[str, float]:
    """A prior over experts, {expert: weight}, for text in language `code` (ISO 639-3):
    softmax(−d_e / temperature), d_e the typological distance `closest_parent` ranks by (X-ELM's
    clustering measure: the smallest lang2vec `syntax_average` cosine distance to any of expert
    e's languages, `expert_codes` = {expert: code or codes}). Keyed by expert name, so that
    `ExpertEnsemble(prior=...)` reads each weight for its own expert whatever the order of
    `expert_codes` (a positional prior weighed the wrong experts when the orders differed). So the
    heaviest expert is the one `closest_parent`
    branches from, and a language of an expert's cluster (d = 0) weighs most on that expert.
    The prior itself is xlsparse's own: X-ELM weights experts by its tf-idf router, or evaluates a
    typological expert alone on its cluster's languages (the limit temperature → 0)."""
    if not checks.is_real(temperature):  # "0.1" failed in the comparison below, unnamed
        raise TypeError(f"typological_prior: temperature must be a number, got {temperature!r}")
    if not temperature > 0:  # a negative one would favour the farthest expert
        raise ValueError(f"typological_prior: temperature must be positive, got {temperature}")
    dist = _typological_distances(expert_codes, code, "typological_prior")
    weights = torch.softmax(-torch.tensor(list(dist.values()), dtype=torch.float64) / temperature, 0)
    return dict(zip(dist, weights.tolist()))


def closest_parent(languages: Mapping[str, str | Sequence[str]], new_language: str) -> str:
    """The expert to branch a new language's expert from: the one whose languages (`languages` =
    {expert: ISO 639-3 code or codes}, e.g. each cluster's members) are closest to `new_language`
    (ISO 639-3) by the typological measure X-ELM clusters with (`cluster_languages`): the smallest
    lang2vec `syntax_average` cosine distance to any of the expert's languages. Ties: the first expert."""
    dist = _typological_distances(languages, new_language, "closest_parent")
    return min(dist, key=dist.get)


# --- training one expert ---

def _grown_support(model: nn.Module, parent: SparseDiff, batch, grow: int, loss_fn: Callable, names: list) -> SparseDiff:
    """The parent's diff plus `grow` new zero-valued entries: the largest |∂L/∂W| on `batch`
    outside the parent's support, global over the target weights (one dense gradient per weight,
    once), at the weights `model` holds (the caller applies the parent first)."""
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    for w in weights:
        w.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    scores, outside = [], []
    for n, w in zip(names, weights):
        g = w.grad.detach().abs().float()
        free = torch.ones_like(g, dtype=torch.bool)
        if n in parent.deltas:
            free.view(-1)[parent.deltas[n].indices.long()] = False
        # The parent's entries score 0: never picked twice. No shift (|g| + 1 rounded small
        # gradients together in float32, and the pick fell back to flat position).
        scores.append(g.masked_fill(~free, 0.0))
        outside.append(free)
        w.grad = None
        w.requires_grad_(False)
    nonzero = sum(int((s > 0).sum()) for s in scores)
    picks = topk_mask(scores, min(grow, nonzero))
    if grow > nonzero:  # the rest among the zero-gradient entries outside the parent's support
        rest = topk_mask([(f & ~p).float() for f, p in zip(outside, picks)], grow - nonzero)
        picks = [p | r for p, r in zip(picks, rest)]
    # the parent's deltas on other layers stay, for convert to refuse as it does without grow: dropped,
    # the child started from base + part of its parent, silently
    new = {n: d for n, d in parent.deltas.items() if n not in names}
    for n, m in zip(names, picks):
        idx = m.reshape(-1).nonzero().squeeze(1)
        if n in parent.deltas:
            old = parent.deltas[n]
            merged = torch.cat([old.indices.long(), idx])
            order = torch.argsort(merged)
            vals = torch.cat([old.values, torch.zeros(idx.numel(), dtype=old.values.dtype)])[order]
            new[n] = SparseDelta._trusted(merged[order].to(old.indices.dtype), vals, old.shape)
        elif idx.numel():
            new[n] = SparseDelta._trusted(idx.to(index_dtype(m.numel())), torch.zeros(idx.numel()), m.shape)
    return SparseDiff._trusted(new)


class _ExpertSetup:
    """A trainable copy of the base for one expert: the model, its optimizer's param groups, and
    the densely trained embedding/head weights by name (their base values are read at the end).
    Two steps: the constructor checks the options and copies the base; `build` converts the copy,
    after a Trainer has been built on it (its own column and collator rules make `grow`'s batch)."""

    def __init__(self, base: nn.Module, k, density, init, grow, target_modules, train_embeddings, what: str):
        checks.flag(what, "train_embeddings", train_embeddings)  # "no" is truthy: it trained the embeddings
        if grow is not None:  # grow=2.5 reached topk_mask, whose error named k
            checks.count(what, "grow", grow)
        _refuse_max_norm(base, what)
        if grow is not None and init is None:
            raise ValueError(f"{what}: grow needs init (the parent expert the child branches from)")
        if init is not None and (k is not None or density is not None):
            raise ValueError(f"{what}: init gives the support (grow adds to it); k and density are for an expert "
                             "drawn at random")
        if init is not None and (init.absolute or (init.dense and not train_embeddings)):
            raise ValueError(f"{what}: init has dense or absolute entries; pass train_embeddings=True to carry "
                             "dense embedding parts, or give a parent with sparse deltas only")
        self.base, self.what = base, what
        self.k, self.density, self.init, self.grow = k, density, init, grow
        self.target_modules, self.train_embeddings = target_modules, train_embeddings
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        self.names = [f"{n}.weight" for n in target_names(model, target_modules)]
        self.dense_names = []  # the embedding and untied head weights, trained densely with train_embeddings
        if train_embeddings:
            named = {id(p): n for n, p in model.named_parameters()}
            for module in (model.get_input_embeddings(), model.get_output_embeddings()):
                if module is not None and id(module.weight) in named and named[id(module.weight)] not in self.dense_names:
                    self.dense_names.append(named[id(module.weight)])
            dropped = sorted(set(init.dense) - set(self.dense_names)) if init is not None else []
            if dropped:  # the child would not start at base + parent
                raise ValueError(f"{what}: init has dense entries {dropped[:3]} outside the embeddings and head, "
                                 "which an expert does not train")
        if grow:
            room = sum(dict(model.named_parameters())[n].numel() for n in self.names) - init.nnz
            if not 0 < grow <= room:
                raise ValueError(f"{what}: grow={grow} must be in [1, {room}] (the entries outside the parent's support)")
        self.model = model

    def build(self, first_batch, loss_fn: Callable) -> None:
        """Convert the copy: the support drawn at random, or the parent's (grown on `first_batch`,
        with `grow`); the dense parts with `train_embeddings`."""
        model, init, what = self.model, self.init, self.what
        if init is not None:
            linear = SparseDiff._trusted(dict(init.deltas))
            if self.grow:
                with init.applied(model):  # the child starts at base + parent: score the gradient there
                    linear = _grown_support(model, linear, first_batch, self.grow, loss_fn, self.names)
            convert(model, self.target_modules, kind="delta", diffs=linear)
        else:
            convert(model, self.target_modules, kind="delta", k=self.k, density=self.density)
        values = [p for n, p in model.named_parameters() if n.endswith("delta_values")]
        self.groups, self.dense = [{"params": values}], {}
        if self.dense_names:
            params = dict(model.named_parameters())  # after convert: a converted head's weight is a new Parameter
            self.dense = {n: params[n] for n in self.dense_names}
            train_outside_diff(model, list(self.dense))  # `diff()` returns them as dense parts
            with torch.no_grad():
                for n, w in self.dense.items():
                    if init is not None and n in init.dense:
                        w.add_(init.dense[n].to(w))
            self.groups.append({"params": list(self.dense.values())})

    def optimizer(self, decay_names=None, **kwargs) -> MaskedAdamW:
        """Compact AdamW over the deltas (and dense parts); weight decay acts on θ = θ0 + Δ, as
        AdamW on the expert's own weights does. `decay_names`: the parameter names weight decay
        reaches (a Trainer's get_decay_parameter_names); the others go to a group without it."""
        groups = self.groups
        if decay_names is not None:
            names, decayed = {id(p): n for n, p in self.model.named_parameters()}, set(decay_names)
            plain = {id(p) for g in groups for p in g["params"] if names[id(p)] not in decayed}
            if plain:  # only then: the groups of a run without such parameters keep their layout (checkpoints)
                groups = [{"params": [p for p in g["params"] if id(p) not in plain]} for g in groups]
                groups = [g for g in groups if g["params"]]
                groups.append({"params": [p for g in self.groups for p in g["params"] if id(p) in plain],
                               "weight_decay": 0.0})
        opt = MaskedAdamW(groups, {}, mode="compact", **kwargs)  # {}: every K-vector and dense part trains whole
        # θ0 is frozen only where the layer's weight is: a head trained densely too (train_embeddings with
        # lm_head in target_modules) decays its own weight, and θ0's share added to Δ decayed it twice
        layers = [m for m in self.model.modules() if isinstance(m, SparseDeltaLinear) and not m.weight.requires_grad]

        def decay(optimizer, *args):
            # θ0 at the support the layers hold at this step, not at the optimizer's creation: a
            # resumed checkpoint's support replaces the drawn one after the Trainer built the optimizer
            if any(g["weight_decay"] > 0 for g in optimizer.param_groups):
                anchors = {m.delta_values: m.weight.detach().reshape(-1)[m.delta_indices.long()] for m in layers}
                decay_the_base_(optimizer, anchors)
        opt.register_step_post_hook(decay)
        return opt

    def diff(self) -> SparseDiff:
        """The expert: the trained sparse deltas, plus dense embedding/head differences."""
        diff = extract_diff(self.model)
        if not self.dense:
            return diff
        base = dict(self.base.named_parameters())
        dense = {n: w.detach() - base[n].detach() for n, w in self.dense.items()}
        deltas = dict(diff.deltas)
        for name in [n for n in deltas if n in dense]:
            # an untied head both converted (target_modules) and trained densely: its change is the
            # sum, one dense entry (the ensemble kept the dense part only, and load refused the file)
            dense[name] = dense[name] + deltas.pop(name).to_dense().to(dense[name])
        return SparseDiff._trusted(deltas, dense)


@accepts_compiled
def train_expert(base: nn.Module, batches: Iterable, k: int | None = None, density: float | None = None,
                 init: SparseDiff | None = None, grow: int | None = None, target_modules=None, lr: float = 1e-3,
                 train_embeddings: bool = False, loss_fn: Callable | None = None, progress: bool = True) -> SparseDiff:
    """Train one sparse expert on `batches` and return it as a SparseDiff; `base` is not changed.

    The support is drawn at random with `k` / `density`, or taken with its values from `init`
    (a parent expert to branch from; its deltas, and with `train_embeddings` its dense parts,
    seed the child). With `init`, `grow` adds that many entries of the child's own: the largest
    gradient magnitudes on the first batch outside the parent's support, taken at base + parent
    (where the child starts training).
    `train_embeddings=True` also trains the input embedding (and an untied output head) densely;
    their changes come back as dense entries, which `ExpertEnsemble` routes per expert.

    One pass over `batches` with AdamW at a constant `lr`, betas (0.9, 0.999), eps 1e-8, no weight
    decay, no warmup and no clipping, in training mode (dropout as the model's config has it).
    X-ELM trains with Adam, betas (0.9, 0.95), eps 1e-6, lr 2e-5 decaying to 0 and gradient clipping
    at 1.0: `ExpertTrainer` takes those from its TrainingArguments (`adam_beta2=0.95,
    adam_epsilon=1e-6, max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=0`).
    """
    _check_batches("train_expert", "batches", batches)
    batches = list(batches)
    if not batches:
        raise ValueError("train_expert: no batches")
    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    setup = _ExpertSetup(base, k, density, init, grow, target_modules, train_embeddings, "train_expert")
    setup.build(batches[0], loss_fn)
    opt = setup.optimizer(lr=lr, weight_decay=0.0)
    setup.model.train()
    for batch in _progress("train_expert", batches, "expert", progress):
        opt.zero_grad(set_to_none=True)
        loss_fn(setup.model, batch).backward()
        opt.step()
    return setup.diff()


try:
    from transformers import Trainer
except ImportError:  # transformers is the optional `hf` extra
    Trainer = object


class ExpertTrainer(Trainer):
    """A transformers `Trainer` that trains one X-ELM expert on its cluster's data: pass the
    shared `base` as `model` plus the expert's sparse options (`k` / `density`, or `init` and
    `grow` to branch a child from a parent, `target_modules`, `train_embeddings`). The base is
    not changed; the Trainer trains a copy whose sparse delta values (and dense embedding/head,
    with `train_embeddings`) are the only trainable parameters, with a compact MaskedAdamW using
    the Trainer's lr, betas, eps and weight decay. After `train()`, `expert()` returns the
    SparseDiff for `ExpertEnsemble`. A support drawn at random (`k` / `density`) is drawn under
    `TrainingArguments.seed`, as the Trainer seeds a `model_init`'s model. `grow` scores the new
    entries on one batch: the train_dataset's first `per_device_train_batch_size` examples, in the
    dataset's order, made as the Trainer's loader makes a batch (its unused columns removed, its data
    collator), at the weights base + parent (train_expert's rule: its first batch).
    `resume_from_checkpoint` refuses, before loading anything, a checkpoint of a run on another
    base model: its frozen weights, or the base of its dense parts (fingerprints that each
    checkpoint holds as `expert_base.pt`), differ from this base's. The
    checkpoint's support and values replace the ones `k`/`density`/`init` gave (a support of
    another size is refused; one of the same size from another `init` is the checkpoint's run's), and a
    checkpoint written with `save_only_model=True` (no optimizer state) or at the run's last step
    (`max_steps`) is refused.
    Accelerate's FSDP plugin and DeepSpeed (`TrainingArguments.fsdp` / `.deepspeed`, or `accelerate
    launch` with either) are refused with a ValueError at construction: the optimizer and
    `expert()` hold the parameters they replace. So is `optimizers=`: built before the trainer
    copies the base, it holds none of the expert's parameters. `TrainingArguments.torch_compile` compiles the
    run also on a base that an earlier compiled run trained. A model whose loss is a mean that
    ignores `num_items_in_batch` (BERT's and XLM-R's masked-LM heads) has it divided by the
    gradient accumulation steps and not multiplied by the processes (`lt_sft.settle_loss_kwargs`),
    where transformers 5.25 adds the micro-batch means."""

    def __init__(self, model: nn.Module, *args, k: int | None = None, density: float | None = None,
                 init: SparseDiff | None = None, grow: int | None = None, target_modules=None,
                 train_embeddings: bool = False, **kwargs):
        if Trainer is object:
            raise ImportError("ExpertTrainer needs transformers (the hf extra)")
        from .lt_sft import _refuse_replaced_parameters, _trainer_argument, _training_args, _unmark_prepared

        training_args = _training_args((model, *args), kwargs)
        _refuse_replaced_parameters("ExpertTrainer", "its optimizer's param groups and dense parts, taken from its copy "
                                    "of the base at construction", training_args)
        # the expert is a copy of `model` made below: an optimizer built before holds other parameters
        # (the base's), so train() stepped none of the expert's and it came back all zeros, silently
        if any(o is not None for o in _trainer_argument("optimizers", (model, *args), kwargs) or ()):
            raise ValueError("ExpertTrainer: optimizers= holds an optimizer or scheduler built before the trainer copied "
                             "the base, so it would step none of the expert's parameters; leave it out (the trainer "
                             "builds compact MaskedAdamW and the scheduler from the TrainingArguments)")
        if grow and _trainer_argument("train_dataset", (model, *args), kwargs) is None:
            raise ValueError("ExpertTrainer: grow needs train_dataset (its first examples score the new entries)")
        # a base compiled by torch.compile is the model it wraps: the expert trains a copy of it
        self.setup = _ExpertSetup(_uncompiled(model), k, density, init, grow, target_modules, train_embeddings,
                                  "ExpertTrainer")
        super().__init__(self.setup.model, *args, **kwargs)
        first = None
        if grow:
            # the first examples in the dataset's order, as the Trainer's loader makes a batch: its columns
            # (remove_unused_columns) and collator (a dataset's extra integer column reached the forward,
            # and a string one the stacking, each a bare TypeError), on the model's device
            collate = self._get_collator_with_removed_columns(self.data_collator, "training")
            dataset = self.train_dataset
            first = self._prepare_inputs(collate([dataset[i] for i in range(
                min(len(dataset), self.args.per_device_train_batch_size))]))
        # the expert is built here, as a Trainer's model_init would build it: its random support is
        # drawn under TrainingArguments.seed (the Trainer's own rule), not the caller's RNG state
        from transformers.trainer_utils import enable_full_determinism, set_seed

        (enable_full_determinism if self.args.full_determinism else set_seed)(self.args.seed)
        self.setup.build(first, lambda m, b: m(**b).loss)
        _refuse_liger_on_converted_head(self.model, self.args, "ExpertTrainer")
        if self.accelerator.num_processes > 1:
            # the support is drawn under TrainingArguments.seed, which a launcher may set per process: take
            # process 0's, as DDP's first sync does only with ddp_broadcast_buffers on (off, each process
            # trained its own support and DDP averaged the gradients of different entries position by position)
            for layer in self.setup.model.modules():
                if isinstance(layer, SparseDeltaLinear):
                    torch.distributed.broadcast(layer.delta_indices, src=0)
        from .subnetworks import _check_own_optimizer

        _check_own_optimizer(self, "ExpertTrainer", "compact MaskedAdamW over the expert's deltas")
        _unmark_prepared(self)  # a copy of a base that an earlier compiled run trained carries the mark

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            a = self.args
            # this trainer's own rule, as the Trainer's create_optimizer: a subclass may override it
            decay = self.get_decay_parameter_names(self.model) if a.weight_decay else None
            self.optimizer = self.setup.optimizer(decay, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                                  eps=a.adam_epsilon, weight_decay=a.weight_decay)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        from .lt_sft import settle_loss_kwargs

        settle_loss_kwargs(self, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    BASE_FILE = "expert_base.pt"

    def _dense_base(self) -> dict:
        """{dense part: fingerprint of its value in the base} (`train_embeddings`)."""
        base = dict(self.setup.base.named_parameters(remove_duplicate=False))
        return {n: _fingerprint(base[n]) for n in self.setup.dense}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and self.setup.dense:  # its weights hold base + trained only
            torch.save(self._dense_base(), os.path.join(output_dir or self.args.output_dir, self.BASE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # LT-SFT's rule, before the Trainer loads the weights: the expert trains its delta values
        # (and dense parts) only, so every other parameter of the checkpoint is its run's base
        # and must be this run's; another base would get the checkpoint's whole model
        from .lt_sft import _load_weights, _refuse_another_base, _refuse_finished, _refuse_model_only

        _refuse_model_only(resume_from_checkpoint)
        _refuse_finished(resume_from_checkpoint, self.args)
        weights = _load_weights(resume_from_checkpoint)
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        _refuse_another_base(resume_from_checkpoint, self.model, weights, frozen, {})
        # the dense parts train whole, but the expert holds them as a difference from the base:
        # the checkpoint names their base by its fingerprints (none in one written before them)
        path = os.path.join(resume_from_checkpoint, self.BASE_FILE)
        saved = torch.load(path, weights_only=True) if os.path.isfile(path) else {}
        other = [n for n, fp in self._dense_base().items() if n in saved and tuple(saved[n]) != fp]
        if other:
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} was trained from another base model: "
                             f"the base of its dense part {other[0]!r} differs from this run's (the expert holds it "
                             "as a difference from that base); build the trainer on the checkpoint's run's base model")
        # another target_modules: the Trainer's load dropped the checkpoint's deltas of the layers this
        # run does not convert, with a log line only, and trained the others from zero
        own = self.model.state_dict()
        saved_deltas, own_deltas = ({n for n in names if n.rsplit(".", 1)[-1] in ("delta_indices", "delta_values")}
                                    for names in (weights, own))
        if saved_deltas != own_deltas:
            other = sorted(saved_deltas ^ own_deltas)
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint}'s expert has deltas on other layers than "
                             f"this run's (e.g. {other[:2]}): it was built with other target_modules; build the trainer "
                             "with its arguments")
        # another k or density: load_state_dict raised on the deltas' sizes only after copying the rest
        resized = sorted(n for n, t in weights.items() if n in own and tuple(t.shape) != tuple(own[n].shape))
        if resized:
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint}'s {resized[:3]} have other sizes than "
                             f"this run's ({tuple(weights[resized[0]].shape)} vs {tuple(own[resized[0]].shape)}): its "
                             "expert was built with another k, density or init; build the trainer with its arguments")
        if not self._load_sharded_at_once(resume_from_checkpoint, model or self.model, weights):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_sharded_at_once(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_sharded_at_once(self, folder, model, weights=None) -> bool:
        """Loads a sharded checkpoint's weights (all shards) into `model` in one call, where the
        Trainer would load it shard by shard (`load_sharded_checkpoint`, strict=False): a delta whose
        `delta_values` and `delta_indices` fall in two shards would be half a pair in each, which
        load_state_dict refuses (values alone would land on another support). False where the
        checkpoint is one file, or FSDP or DeepSpeed load it."""
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

        has = lambda name: folder is not None and os.path.isfile(os.path.join(folder, name))  # noqa: E731
        sharded = any(map(has, (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME))) and not any(map(has, (SAFE_WEIGHTS_NAME, WEIGHTS_NAME)))
        if not sharded or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        from .lt_sft import _load_weights

        weights = _load_weights(folder) if weights is None else weights
        self._issue_warnings_after_load(model.load_state_dict(weights, strict=False))
        return True

    def expert(self) -> SparseDiff:
        """The trained expert as a SparseDiff over the base's parameters."""
        return self.setup.diff()
