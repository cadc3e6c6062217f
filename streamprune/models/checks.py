"""Is this directory a model streamprune can load? Answered from the files alone, before
transformers (or a Ray actor) sees them, as one ModelError line naming the file and the field.

Why not let transformers find out: a config missing `text_config` makes it build its default 7B
decoder (minutes of random init, then a size-mismatch traceback); a wrong `model_type` loads
with every weight "unexpected" and answers noise; a broken weights file fails deep in
safetensors. Checked here: every JSON file the loaders read is a UTF-8 JSON object; `model_type`
is a supported family; the fields that size the model are present and positive integers, and
`layer_types` has one entry per layer; `streamprune.json`'s entries have their types; each
safetensors header (8-byte length + JSON, read with a size cap, never the tensors) is sane and
its tensors cover the file exactly; a few key tensors have the shapes the config implies (token
embedding and LM head `[vocab, hidden]`, layer 0's projections, the decoder's and the vision
tower's layer counts, the vision patch embedding, which also tells another family's weights
apart); and finally transformers' own typed config accepts the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamprune.errors import ModelError
from streamprune.models.prompt import SIDECAR, VIDEO_PLACEHOLDER

# Files transformers or the adapters read as JSON, when present.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json",
              "processor_config.json", "chat_template.json", SIDECAR)
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
TEXT_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "num_attention_heads")


@dataclass(frozen=True)
class FamilySpec:
    """Where a family's parts show in config and weights: the vision tower's sizing fields, its
    layer-count field, its patch embedding key (relative to the tower), that key's expected
    shape and the tower's layer keys; `text_at_top`: the text fields may sit at the top level
    instead of in text_config (Qwen2.5-VL's published configs)."""

    fields: tuple[str, ...]
    layers: str
    patch_key: str
    layer_key: str
    patch_shape: Callable[[dict[str, Any]], list[int]]
    text_at_top: bool = False


FAMILY_SPECS = {
    "llava_onevision": FamilySpec(  # SigLIP
        ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "intermediate_size", "num_attention_heads"),
        "num_hidden_layers", "embeddings.patch_embedding.weight", "encoder.layers.",
        lambda v: [v["hidden_size"], v.get("num_channels", 3), v["patch_size"], v["patch_size"]]),
    "qwen2_5_vl": FamilySpec(  # Qwen2.5-VL ViT
        ("depth", "hidden_size", "out_hidden_size", "intermediate_size", "num_heads"),
        "depth", "patch_embed.proj.weight", "blocks.",
        lambda v: [v["hidden_size"], v.get("in_channels", v.get("in_chans", 3)), v.get("temporal_patch_size", 2),
                   v.get("patch_size", 14), v.get("patch_size", 14)], text_at_top=True),
}


def read_json_object(path: Path) -> dict[str, Any]:
    """A file that must hold one JSON object, or a ModelError saying what it holds instead."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB; not a model file")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{path} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise ModelError(f"{path} is nested too deeply") from None
    except OSError as err:
        raise ModelError(f"{path} cannot be read: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object, not a {_kind(data)}")
    return data


def _kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null", dict: "object"}.get(type(value), type(value).__name__)


def _int(section: dict[str, Any], name: str, where: str, required: bool = True) -> int | None:
    value = section.get(name)
    if value is None and not required:
        return None
    if value is None:
        raise ModelError(f"{where}.{name} is missing")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelError(f"{where}.{name} must be a positive integer, got {value!r}")
    return value


def _section(config: dict[str, Any], name: str, file: Path) -> dict[str, Any]:
    value = config.get(name)
    if not isinstance(value, dict):
        raise ModelError(f"{file}: {name} is {'missing' if value is None else 'a ' + _kind(value)}; "
                         "expected an object")
    return value


def check_config(config: dict[str, Any], file: Path) -> str:
    """The supported `model_type` of `config`, after its sizing fields are checked."""
    from streamprune.models import FAMILIES

    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(f"{file}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    spec = FAMILY_SPECS.get(model_type)  # a family without a spec gets the generic checks only
    on_top = spec is not None and spec.text_at_top and "text_config" not in config
    text = config if on_top else _section(config, "text_config", file)
    where = f"{file}: {'config' if on_top else 'text_config'}"
    for name in TEXT_FIELDS:
        _int(text, name, where)
    _int(text, "num_key_value_heads", where, required=False)
    _int(text, "head_dim", where, required=False)
    layer_types = text.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ModelError(f"{where}.layer_types must be a list of strings")
        if len(layer_types) != text["num_hidden_layers"]:
            raise ModelError(f"{where}.layer_types has {len(layer_types)} entries for num_hidden_layers "
                             f"{text['num_hidden_layers']}")
    vision = _section(config, "vision_config", file)
    for name in spec.fields if spec is not None else ():
        _int(vision, name, f"{file}: vision_config")
    return model_type


def _tensor(name: str, info: Any, file: Path, data_bytes: int) -> tuple[list[int], int, int]:
    if not isinstance(info, dict):
        raise ModelError(f"{file}: header entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise ModelError(f"{file}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise ModelError(f"{file}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ModelError(f"{file}: tensor {name!r} has data offsets {offsets!r} outside the file's "
                         f"{data_bytes} data bytes (truncated?)")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise ModelError(f"{file}: tensor {name!r} of shape {shape} ({dtype}) does not fit its "
                         f"{offsets[1] - offsets[0]} bytes")
    return shape, offsets[0], offsets[1]


def safetensors_tensors(file: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype)} from a safetensors header, read with a size cap; the tensors
    must tile the data after the header exactly (no gap, no overlap, nothing missing)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0:
                raise ModelError(f"{file} is {size} bytes: too short for a safetensors file")
            if length > MAX_HEADER_BYTES:
                raise ModelError(f"{file}: safetensors header claims {length} bytes (limit {MAX_HEADER_BYTES}); "
                                 "not a safetensors file")
            if 8 + length > size:
                raise ModelError(f"{file} is truncated: its header claims {length} bytes, the file has {size - 8}")
            raw = fh.read(length)
    except OSError as err:
        raise ModelError(f"{file} cannot be read: {err.strerror or err}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError(f"{file}: the safetensors header is not a JSON text; not a safetensors file") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: the safetensors header is a {_kind(header)}, not an object")
    data_bytes = size - 8 - length
    shapes, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise ModelError(f"{file}: __metadata__ is not an object")
            continue
        shape, start, end = _tensor(name, info, file, data_bytes)
        shapes[name] = (shape, info["dtype"])
        spans.append((start, end, name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise ModelError(f"{file}: tensor {name!r} starts at byte {start}, expected {position} "
                             "(overlapping or missing data)")
        position = end
    if position != data_bytes:
        raise ModelError(f"{file}: the tensors cover {position} of its {data_bytes} data bytes (incomplete metadata)")
    return shapes


def weight_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Every tensor's shape, from model.safetensors or from the shards its index names."""
    return {name: shape for name, (shape, _) in weight_tensors(model_dir).items()}


def weight_tensors(model_dir: Path) -> dict[str, tuple[list[int], str]]:
    """Every tensor's (shape, dtype), from model.safetensors or from the shards its index names."""
    single, index = model_dir / WEIGHTS, model_dir / INDEX
    if single.is_file():
        return safetensors_tensors(single)
    if not index.is_file():
        raise ModelError(f"model path {model_dir} has no {WEIGHTS} (or {INDEX})")
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index}: weight_map must be a non-empty object")
    shards = set(weight_map.values())
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s or not (model_dir / s).is_file()]
    if bad:
        raise ModelError(f"{index}: weight_map names shard {bad[0]!r}, which is not a file in {model_dir}")
    shapes: dict[str, tuple[list[int], str]] = {}
    for shard in sorted(shards):
        shapes.update(safetensors_tensors(model_dir / shard))
    missing = sorted(set(weight_map) - set(shapes))
    if missing:
        raise ModelError(f"{index}: tensor {missing[0]!r} is not in its shard {weight_map[missing[0]]}")
    return shapes


def _layer_count(shapes: dict[str, list[int]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def _expect(shapes: dict[str, list[int]], key: str, expected: list[int], file: Path, why: str) -> None:
    if key in shapes and shapes[key] != expected:
        raise ModelError(f"{file}: {key} has shape {shapes[key]}, but {why} implies {expected}")


def check_weights(model_type: str, config: dict[str, Any], shapes: dict[str, list[int]], file: Path) -> None:
    """The key tensors have the shapes `config` implies (see the module docstring)."""
    text = config.get("text_config") or config
    vocab, hidden, layers = text["vocab_size"], text["hidden_size"], text["num_hidden_layers"]
    embeds = [k for k in shapes if k == "embed_tokens.weight" or k.endswith(".embed_tokens.weight")]
    if len(embeds) != 1:
        raise ModelError(f"{file}: expected one embed_tokens weight, found {len(embeds)}; not a {model_type} model")
    prefix = embeds[0][: -len("embed_tokens.weight")]
    why = "config.json (vocab_size x hidden_size)"
    _expect(shapes, embeds[0], [vocab, hidden], file, why)
    for key in (k for k in shapes if k == "lm_head.weight" or k.endswith(".lm_head.weight")):
        _expect(shapes, key, [vocab, hidden], file, why)
    found = _layer_count(shapes, f"{prefix}layers.")
    if found != layers:
        raise ModelError(f"{file}: the weights hold {found} decoder layers, config.json num_hidden_layers says {layers}")
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or hidden // heads
    kv_heads = text.get("num_key_value_heads") or heads
    layer0 = f"{prefix}layers.0."
    _expect(shapes, f"{layer0}self_attn.q_proj.weight", [heads * head_dim, hidden], file, "num_attention_heads")
    _expect(shapes, f"{layer0}self_attn.k_proj.weight", [kv_heads * head_dim, hidden], file, "num_key_value_heads")
    _expect(shapes, f"{layer0}mlp.up_proj.weight", [text["intermediate_size"], hidden], file, "intermediate_size")
    spec, vision = FAMILY_SPECS.get(model_type), config["vision_config"]
    if spec is None:
        return
    patches = [k for k in shapes if k.endswith(spec.patch_key)]
    if len(patches) != 1:
        raise ModelError(f"{file}: no vision patch embedding (*{spec.patch_key}) in the weights; "
                         f"are they a {model_type} model?")
    _expect(shapes, patches[0], spec.patch_shape(vision), file, "vision_config")
    tower = patches[0][: -len(spec.patch_key)]
    found = _layer_count(shapes, f"{tower}{spec.layer_key}")
    if found != vision[spec.layers]:
        raise ModelError(f"{file}: the weights hold {found} vision layers, vision_config.{spec.layers} says "
                         f"{vision[spec.layers]}")


def check_sidecar(sidecar: dict[str, Any], file: Path, vocab_size: int) -> None:
    """streamprune.json: a prompt template with the video placeholder, string tokens, a VLA spec."""
    template = sidecar.get("prompt_template")
    if template is not None:
        if not isinstance(template, str) or VIDEO_PLACEHOLDER not in template:
            raise ModelError(f"{file}: prompt_template must be a string containing {VIDEO_PLACEHOLDER!r}")
        try:
            template.format(question="")
        except (KeyError, IndexError, ValueError) as err:
            raise ModelError(f"{file}: prompt_template may hold only the {{question}} field ({err})") from None
    if not isinstance(sidecar.get("eos_token", ""), str):
        raise ModelError(f"{file}: eos_token must be a string")
    stops = sidecar.get("answer_stop", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ModelError(f"{file}: answer_stop must be a list of strings")
    vla = sidecar.get("vla")
    if vla is None:
        return
    where = f"{file}: vla"
    if not isinstance(vla, dict):
        raise ModelError(f"{where} must be an object")
    _int(vla, "action_dim", where)
    bins = _int(vla, "bins", where, required=False) or 256
    if bins >= vocab_size:
        raise ModelError(f"{where}.bins ({bins}) must be below the vocabulary size {vocab_size}")
    low, high = vla.get("low", -1.0), vla.get("high", 1.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
            or not low < high:
        raise ModelError(f"{where}: low and high must be finite numbers with low < high, got {low!r}, {high!r}")
    layer = vla.get("action_layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
        raise ModelError(f"{where}.action_layer must be a non-negative integer or absent")


def _check_tokenizer(file: Path) -> None:
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise ModelError(f"{file} is not a tokenizer: {str(err).splitlines()[0] if str(err) else err}") from None


def _check_with_transformers(model_dir: Path) -> None:
    """transformers' strict config types (floats, enums, rope settings) beyond the sizing fields."""
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - strict-dataclass, value and key errors all mean a bad config
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"{model_dir / 'config.json'} is rejected by transformers: {detail}") from None


def check_model_dir(path: str | Path) -> str:
    """Every check of the module docstring on `path`; returns its model_type."""
    model_dir = Path(path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model path {str(path)!r} does not exist or has no config.json")
    files = {name: read_json_object(model_dir / name) for name in JSON_FILES if (model_dir / name).exists()}
    config = files["config.json"]
    model_type = check_config(config, config_file)
    shapes = weight_shapes(model_dir)
    check_weights(model_type, config, shapes, model_dir / (WEIGHTS if (model_dir / WEIGHTS).is_file() else INDEX))
    if SIDECAR in files:
        check_sidecar(files[SIDECAR], model_dir / SIDECAR, (config.get("text_config") or config)["vocab_size"])
    if (model_dir / "tokenizer.json").exists():
        _check_tokenizer(model_dir / "tokenizer.json")
    _check_with_transformers(model_dir)
    return model_type
