"""The user's knobs of a converted model (PEFT's `config.py` role), saved beside the diff."""
import json
import os
from dataclasses import asdict, dataclass, field

CONFIG_NAME = "xlsparse_config.json"
KINDS = ("delta", "multi", "subnetwork")


@dataclass
class XlsparseConfig:
    """What `xlsparse.hf.convert` did to a model: enough to redo it on a fresh base.

    kind: "delta" | "multi" | "subnetwork".
    target_modules: the names of the converted linear layers (resolved, exact).
    density / k: the support budget asked for (kind="delta" with a random support), else None.
    languages: language (or expert) names in id order (kinds "multi" and "subnetwork").
    modules_to_save: names of the modules trained densely beside the sparse parts.
    keep_tied: the tied target layers converted all the same (`convert`'s keep_tied); a reload
      converts them so too (without it, a save of such a model was refused at reload).
    base_model: the base model's name or path, when known.
    xlsparse_version: the version that wrote it.
    target_request: {"target_modules": what convert was given} (None: every block linear layer), so
      that a base where it selects other layers (a deeper model) is told apart; None in a save
      written before it was recorded.
    base_fingerprint: {parameter name: the fingerprint of its base values} for every converted weight
      and every other parameter the diff does not hold (embeddings, norms, a head not saved), written by
      `save_pretrained` and checked by `from_pretrained` (`model._weight_fingerprint`); None in a save
      written before it was recorded (an older save holds the converted weights' only).
    model_class: the class name of the model that was saved (`save_pretrained`); a reload of saved
      modules onto another class (a sequence classifier's head into a token classifier's module of
      the same name) is warned of. None in a save written before it was recorded.
    """

    kind: str = "delta"
    target_modules: list[str] = field(default_factory=list)
    density: float | None = None
    k: int | None = None
    languages: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    keep_tied: list[str] = field(default_factory=list)
    base_model: str | None = None
    xlsparse_version: str = ""
    target_request: dict | None = None
    base_fingerprint: dict | None = None
    model_class: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"XlsparseConfig: kind must be one of {KINDS}, got {self.kind!r}")

    def save(self, directory: str) -> str:
        """Write this config as JSON into `directory`; returns the file's path."""
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, directory: str) -> "XlsparseConfig":
        """Read the config that `save` wrote into `directory`."""
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"from_pretrained: {path} does not exist; was the folder written by "
                                    "xlsparse.hf.save_pretrained?") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"from_pretrained: {path} is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"from_pretrained: {path} must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"from_pretrained: {path} has unknown keys {sorted(unknown)}")
        return cls(**raw)
