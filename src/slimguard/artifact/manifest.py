"""The schema of a ``.slim`` manifest, checked right after it is parsed and before anything is built.

Every field has a type (pydantic v2, strict: no coercion); a manifest that does not fit is refused with
one :class:`~slimguard.core.errors.ArtifactError` naming the field, for example
``manifest.tensors['fc.weight'].shape: field required``. Nothing in a manifest can name code: module
classes, zoo factories and codecs are names looked up in slimguard's allowlists, a python model source is
only rebuilt from a file the *caller* names (``trust_code``), and its factory must be a plain identifier
whose keyword arguments are JSON scalars.

Example:
    ``validate_manifest({"format": "slimguard"}, "m.slim")`` raises
    ``ArtifactError("m.slim: manifest.format_version: field required")``.
"""

from __future__ import annotations

import keyword
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationError,
)

from slimguard.core.errors import ArtifactError

DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
               "bool")
MAX_DIMS = 16


def _identifier(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name) or (name.startswith("__") and name.endswith("__")):
        raise ValueError(f"{name!r} is not a plain Python identifier")
    return name


Identifier = Annotated[str, AfterValidator(_identifier)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Scalar = str | int | float | bool | None
NonNegInt = Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EntryMeta(_Strict):
    sha256: Sha256
    size: NonNegInt


class ZooSource(_Strict):
    """A zoo architecture: ``factory`` is looked up in :data:`slimguard.models.zoo.FACTORIES`."""

    kind: Literal["zoo"]
    name: str
    factory: str
    kwargs: dict[str, JsonValue] = Field(default_factory=dict)


class PythonSource(_Strict):
    """A user factory; rebuilt only from the file the caller names (``trust_code``), checked by sha256."""

    kind: Literal["python"]
    file: str
    factory: Identifier
    kwargs: dict[str, Scalar] = Field(default_factory=dict)
    sha256: Sha256 | None = None


class HfSource(_Strict):
    """A Hugging Face config (``model_type`` from transformers' own mapping; remote code refused)."""

    kind: Literal["hf"]
    config: dict[str, JsonValue]
    pooling: Literal["mean", "cls"] = "mean"
    name: str | None = None
    tokenizer_dir: str | None = None
    task: str | None = None
    tokenizer: dict[str, str] | None = None  # tokenizer file name -> base64 of its bytes (models.hf)
    image: dict[str, list[float]] | None = None  # image mean / std of an image classifier


class ModelSection(_Strict):
    source: Annotated[ZooSource | PythonSource | HfSource, Field(discriminator="kind")]
    task: str = "classification"
    data: dict[str, JsonValue] = Field(default_factory=dict)
    history: list[JsonValue] = Field(default_factory=list)


class ModuleRecord(_Strict):
    class_: str = Field(alias="class")
    init: dict[str, JsonValue] = Field(default_factory=dict)


class TiedTensor(_Strict):
    tied: str


class CodedTensor(BaseModel):
    """A tensor's codec header; codecs add their own JSON fields (e.g. ``nnz`` for ``sparse``)."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, JsonValue]
    codec: str
    shape: Annotated[list[NonNegInt], Field(max_length=MAX_DIMS)]
    dtype: Literal[DTYPE_NAMES]  # type: ignore[valid-type]
    parts: dict[str, Literal["bytes", "tensor"]] = Field(default_factory=dict)


def _tensor_kind(value: Any) -> str:
    return "tied" if isinstance(value, dict) and "tied" in value else "coded"


_TAGS = ("tied", "coded", "zoo", "python", "hf")
TensorRecord = Annotated[
    Annotated[TiedTensor, Tag("tied")] | Annotated[CodedTensor, Tag("coded")], Discriminator(_tensor_kind)
]
AttrValue = Scalar | Annotated[list[int | float | bool], Field(max_length=16)]


class Manifest(_Strict):
    format: Literal["slimguard"]
    format_version: int
    created: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    model: ModelSection
    modules: dict[str, ModuleRecord] = Field(default_factory=dict)
    attrs: dict[str, dict[str, AttrValue]] = Field(default_factory=dict)
    tensors: dict[str, TensorRecord]
    masked: list[str] = Field(default_factory=list)
    metrics: dict[str, JsonValue] = Field(default_factory=dict)
    recipe: dict[str, JsonValue] = Field(default_factory=dict)
    entries: dict[str, EntryMeta]


# how many dictionary keys follow each mapping field in an error location (attrs: module, then attribute)
_MAPPINGS = {"versions": 1, "modules": 1, "attrs": 2, "tensors": 1, "metrics": 1, "recipe": 1, "entries": 1,
             "kwargs": 1, "config": 1, "data": 1, "init": 1, "parts": 1}
_FIELDS = {f.alias or name for model in (Manifest, ModelSection, ZooSource, PythonSource, HfSource, ModuleRecord,
                                         TiedTensor, CodedTensor, EntryMeta)
           for name, f in model.model_fields.items()}


def field_path(loc: tuple[str | int, ...]) -> tuple[str, list[str]]:
    """``('tensors', 'fc.weight', 'coded', 'shape')`` -> ``("manifest.tensors['fc.weight'].shape", ["coded"])``:
    the field's path, and the union members pydantic tried on the way (not part of the path)."""
    out, keys, tried, tag_next = "manifest", 0, [], False
    for seg in loc:
        if tag_next and seg in ("tied", "coded"):  # the member of a tensor record's union
            tried.append(seg)
        elif isinstance(seg, int):
            out += f"[{seg}]"
        elif keys:
            out += f"[{seg!r}]"
            keys -= 1
            tag_next = out.startswith("manifest.tensors[") and keys == 0 and out.count("[") == 1
            continue
        elif seg in _FIELDS:
            out += f".{seg}"
            keys = _MAPPINGS.get(seg, 0)
        else:
            tried.append(seg)
        tag_next = False
    return out, tried


def validate_manifest(raw: Any, where: str) -> dict[str, Any]:
    """Check ``raw`` (parsed JSON) against :class:`Manifest`; return it unchanged or raise ArtifactError."""
    try:
        Manifest.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        path, _ = field_path(tuple(errors[0]["loc"]))
        same = [e for e in errors if field_path(tuple(e["loc"]))[0] == path]
        msg = str(errors[0]["msg"])
        if len(same) > 1:  # a value no member of a union accepts (e.g. a list where a scalar belongs)
            kinds = [field_path(tuple(e["loc"]))[1][-1:] for e in same]
            msg = "not an allowed type; allowed: " + ", ".join(k[0] for k in kinds if k)
        raise ArtifactError(f"{where}: {path}: {msg[:1].lower() + msg[1:]}") from None
    except (RecursionError, ValueError, TypeError) as exc:  # absurd nesting and the like
        raise ArtifactError(f"{where}: manifest structure cannot be checked ({type(exc).__name__})") from None
    return raw
