"""The README's Python snippets run as written: each ```python block is extracted from README.md
(not copied here) and executed on tiny models, with the names the README says it assumes."""
import copy
import os
import re

import pytest
import torch
import xlsparse
from tiny_models import VOCAB, batch, random_diff

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def snippets() -> list[str]:
    if not os.path.exists(README):  # the tests run against an installed wheel, away from the source tree
        return []
    return re.findall(r"^```python\n(.*?)^```$", open(README, encoding="utf-8").read(), flags=re.S | re.M)


def _classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def namespace(tmp_path):
    """The names the README's snippets assume, built from tiny models."""
    model, base = _classifier(), _classifier()
    g = torch.Generator().manual_seed(3)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(3, VOCAB, (8, 6), generator=g).tolist(),
                                       "labels": torch.randint(0, 3, (8,), generator=g).tolist()})
    training_args = transformers.TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4,
                                                   learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no")
    lang_tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in lang_tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    ids = batch(4, 6)
    # a language SFT as composable-sft trains one on a masked LM: with its MLM head, which the classifier lacks
    lang = random_diff(base, 30, 0.1, 1)
    lang_sft = xlsparse.SparseDiff(lang.deltas, absolute={"cls.predictions.bias": torch.randn(VOCAB, generator=g)})
    return dict(model=model, base=base, data=data, training_args=training_args, ids=ids, lang_tuned=lang_tuned,
                lang_sft=lang_sft, phi_de=random_diff(base, 30, 0.1, 2), phi_fr=random_diff(base, 30, 0.1, 3),
                evaluate=lambda m: float(m(input_ids=ids).logits.float().mean()))


def test_the_readme_has_the_snippets():
    if not os.path.exists(README):
        pytest.skip("README.md is not here (tests of an installed wheel)")
    assert len(snippets()) >= 5


@pytest.mark.parametrize("index", range(len(snippets())))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = namespace(tmp_path)
    exec(compile(snippets()[index], f"README.md snippet {index}", "exec"), names)
