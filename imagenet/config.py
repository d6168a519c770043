"""torchdistill 1.x YAML recipes, read in two phases so every mistake is caught before any work.

Phase 1 (:func:`load_recipe`) parses the file with torchdistill's tags (``!import_call``, ``!join``, ...) kept as
inert :class:`Tagged` nodes, so ``--opts`` overrides, ``--data-root`` and :func:`check_recipe` see the whole recipe
without importing data or building anything. Phase 2 (:func:`resolve`) evaluates the tags exactly as torchdistill's
``yaml_util.load_yaml_file`` would (same functions from ``torchdistill.common.main_util``).

Data root: the recipes read it as ``!import_call {key: os.getenv, init: {args: [<VAR>, <default>]}}``, so plain
torchdistill honours the environment variable too; ``--data-root`` replaces every such node's value.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import math
import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchdistill
import yaml
from torchdistill.common import main_util
from torchdistill.core import distillation, training  # noqa: F401  (fills torchdistill's registries)
from torchdistill.datasets.registry import BATCH_SAMPLER_DICT
from torchdistill.losses.registry import (
    HIGH_LEVEL_LOSS_DICT,
    LOSS_DICT,
    LOSS_WRAPPER_DICT,
    LOW_LEVEL_LOSS_DICT,
    MIDDLE_LEVEL_LOSS_DICT,
)
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT
from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT

import imagenet.registry  # noqa: F401  (this project's names)
from projector_kd.engine.config import check_finite, load_yaml, merge_configs, validate
from projector_kd.engine.errors import UserError

MAPPING_TAGS = ("!import_get", "!import_call", "!import_call_method", "!call_method", "!access_by_index_or_key")
SEQUENCE_TAGS = ("!join", "!pathjoin", "!getattr", "!setattr")
SCALAR_TAGS = ("!expanduser", "!abspath")
ENV_LOOKUP_KEY = "os.getenv"
BASE_KEY = "_base_"


class Tagged:
    """A node of the recipe carrying an unevaluated torchdistill tag."""

    tag: str


class TaggedMap(dict, Tagged):
    def __init__(self, tag: str, items: dict) -> None:
        super().__init__(items)
        self.tag = tag


class TaggedSeq(list, Tagged):
    def __init__(self, tag: str, items: list) -> None:
        super().__init__(items)
        self.tag = tag


class TaggedStr(str, Tagged):
    def __new__(cls, tag: str, value: str) -> TaggedStr:
        obj = super().__new__(cls, value)
        obj.tag = tag
        return obj

    def __getnewargs__(self) -> tuple[str, str]:  # copy and pickle rebuild the node with its tag
        return self.tag, str(self)


class _RecipeLoader(yaml.SafeLoader):
    pass


def _construct(loader: _RecipeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode) and node.tag in MAPPING_TAGS:
        return TaggedMap(node.tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode) and node.tag in SEQUENCE_TAGS:
        return TaggedSeq(node.tag, loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.ScalarNode) and node.tag in SCALAR_TAGS:
        return TaggedStr(node.tag, loader.construct_scalar(node))
    raise yaml.constructor.ConstructorError(
        None, None, f"tag {node.tag} is not allowed on a {node.id}", node.start_mark
    )


for _tag in MAPPING_TAGS + SEQUENCE_TAGS + SCALAR_TAGS:
    _RecipeLoader.add_constructor(_tag, _construct)


def find_recipe(path: str | os.PathLike) -> Path:
    """The recipe at ``path``; a relative path missing from the working directory is looked up from the repository
    root too, so the release's ``cd imagenet; python image_classification.py --config configs/...`` works."""
    path = Path(path).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    from_root = Path(__file__).resolve().parent.parent / path
    return from_root if from_root.is_file() else path


def load_recipe(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Parse a torchdistill recipe with its tags kept inert (phase 1).

    A recipe may start from another: ``_base_: other.yaml`` (relative to the recipe's folder) is loaded first and the
    recipe's own keys are merged over it (:func:`projector_kd.engine.config.merge_configs`: plain mappings merge key by
    key, anything else replaces). YAML anchors do not cross files: an overlay names the values it changes in full.
    """
    path = Path(path)
    recipe = load_yaml(
        path,
        loader=_RecipeLoader,
        missing_hint=" — pass --config with a path relative to the working directory or to the repository root",
    )
    base_name = recipe.pop(BASE_KEY, None)
    if base_name is None:
        return recipe
    if not isinstance(base_name, str) or not base_name:
        raise UserError(f"{path}: {BASE_KEY} must name a recipe file relative to {path.parent}, got {base_name!r}")
    base_path = (path.parent / base_name).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise UserError(
            f"{path}: {BASE_KEY} {base_name} leads back to {base_path} — recipes cannot include each other in a cycle"
        )
    if not base_path.is_file():
        raise UserError(f"{path}: {BASE_KEY} file not found: {base_path} — the path is relative to {path.parent}")
    return merge_configs(load_recipe(base_path, (*_seen, path.resolve())), recipe)


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def env_lookups(recipe: dict) -> list[TaggedMap]:
    """The ``!import_call os.getenv`` nodes of the recipe (the data-root lookups)."""
    return [
        node
        for node in _walk(recipe)
        if isinstance(node, TaggedMap) and node.tag == "!import_call" and node.get("key") == ENV_LOOKUP_KEY
    ]


def set_data_root(recipe: dict, root: str) -> None:
    """Point every ``os.getenv`` data-root lookup of the recipe at ``root`` (the ``--data-root`` flag)."""
    lookups = env_lookups(recipe)
    if not lookups:
        raise UserError(
            "--data-root: this config has no `!import_call {key: os.getenv, ...}` data-root entry; "
            "edit its dataset paths instead"
        )
    for node in lookups:
        args = list(node.get("init", {}).get("args", []))
        node["init"] = {"args": [args[0] if args else "DATA_ROOT", str(root)]}
        node["_overridden"] = True


def resolve(node: Any, memo: dict | None = None) -> Any:
    """Evaluate torchdistill's tags (phase 2); shared (aliased) nodes are evaluated once, as YAML anchors are."""
    memo = {} if memo is None else memo
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, TaggedMap):
        if node.get("_overridden"):
            result = node["init"]["args"][1]
        else:
            entry = {k: resolve(v, memo) for k, v in node.items()}
            result = _call_mapping_tag(node.tag, entry)
    elif isinstance(node, TaggedSeq):
        items = [resolve(v, memo) for v in node]
        result = _call_sequence_tag(node.tag, items)
    elif isinstance(node, TaggedStr):
        result = os.path.expanduser(str(node)) if node.tag == "!expanduser" else os.path.abspath(str(node))
    elif isinstance(node, dict):
        result = {k: resolve(v, memo) for k, v in node.items()}
    elif isinstance(node, list):
        result = [resolve(v, memo) for v in node]
    else:
        return node
    memo[id(node)] = result
    return result


def _call_mapping_tag(tag: str, entry: dict) -> Any:
    if tag == "!import_get":
        return main_util.import_get(**entry)
    if tag == "!import_call":
        return main_util.import_call(**entry)
    if tag == "!import_call_method":
        return main_util.import_call_method(**entry)
    if tag == "!call_method":
        return main_util.call_method(**entry)
    return entry["data"][entry["index_or_key"]]


def _call_sequence_tag(tag: str, items: list) -> Any:
    if tag == "!join":
        return "".join(str(i) for i in items)
    if tag == "!pathjoin":
        return os.path.expanduser(os.path.join(*[str(i) for i in items]))
    if tag == "!getattr":
        return getattr(*items)
    setattr(*items)
    return items[0]


def to_plain(node: Any) -> Any:
    """The recipe as plain YAML data (tags written as ``{'!tag': value}``), e.g. for a run folder's config.yaml."""
    if isinstance(node, TaggedMap):
        return {node.tag: {k: to_plain(v) for k, v in node.items()}}
    if isinstance(node, TaggedSeq):
        return {node.tag: [to_plain(v) for v in node]}
    if isinstance(node, TaggedStr):
        return {node.tag: str(node)}
    if isinstance(node, dict):
        return {k: to_plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [to_plain(v) for v in node]
    return node


# --------------------------------------------------------------------------------------------------- key checks
# The keys torchdistill reads from each section of a recipe are taken from torchdistill's own source (the functions
# that read that section, see :func:`torchdistill_keys`), so an upgrade that reads new keys needs no change here, and
# one that renames a reader fails loudly instead of going stale. Any other key would be silently ignored, so it is an
# error. Keys starting with '_' are free (YAML anchors live there, as in torchdistill's own recipes).

TOP_KEYS = {"dependencies", "datasets", "models", "train", "test", "runtime"}  # what this entry point reads
OWN_MODEL_KEYS = {"src_ckpt", "dst_ckpt"}  # read by imagenet/image_classification.py
OWN_TRAIN_KEYS = {"log_freq"}  # read by imagenet.engine
RUNTIME_KEYS = {"fast", "loader", "fast_loader"}
WRAPPER_SUPPLIED = {"device", "device_ids", "distributed", "teacher_model", "student_model"}


def keys_read(function: Callable, name: str) -> frozenset[str]:
    """The string keys ``function``'s source reads from the mapping called ``name`` (a parameter or a local):
    ``name[k]``, ``name.get(k, ...)``, ``name.pop(k, ...)``, ``name.setdefault(k, ...)``, ``k in name``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))

    def is_mapping(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == name

    def literal(node: ast.AST) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_mapping(node.value):
            key = literal(node.slice)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and is_mapping(node.func.value)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
        ):
            key = literal(node.args[0])
        elif (
            isinstance(node, ast.Compare)
            and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.In, ast.NotIn))
            and is_mapping(node.comparators[0])
        ):
            key = literal(node.left)
        else:
            continue
        if key is not None:
            keys.add(key)
    return frozenset(keys)


@functools.cache
def torchdistill_keys() -> dict[str, frozenset[str]]:
    """Per recipe section, the keys the installed torchdistill reads (from the functions that read that section)."""
    from torchdistill.core import util as core_util
    from torchdistill.core.distillation import DistillationBox
    from torchdistill.core.training import TrainingBox
    from torchdistill.datasets import util as data_util
    from torchdistill.losses import high_level, mid_level
    from torchdistill.losses import registry as loss_registry
    from torchdistill.models import util as model_util
    from torchdistill.models import wrapper as model_wrapper
    from torchdistill.models.official import get_image_classification_model

    from imagenet.models import build_model

    readers = {
        "model": [(get_image_classification_model, "model_config"), (build_model, "config")],
        "train": [
            (DistillationBox.__init__, "train_config"),
            (DistillationBox.setup, "train_config"),
            (DistillationBox.setup_data_loaders, "train_config"),
            (DistillationBox.setup_loss, "train_config"),
            (DistillationBox.setup_pre_post_processes, "train_config"),
            (TrainingBox.__init__, "train_config"),
            (TrainingBox.setup, "train_config"),
        ],
        "side": [
            (DistillationBox.setup_teacher_student_models, "teacher_config"),
            (DistillationBox.setup_teacher_student_models, "student_config"),
            (DistillationBox.setup, "teacher_config"),
            (DistillationBox.setup, "student_config"),
            (TrainingBox.setup_model, "model_config"),
            (TrainingBox.setup, "model_config"),
            (model_util.redesign_model, "model_config"),
            (model_wrapper.build_auxiliary_model_wrapper, "model_config"),
            (core_util.set_hooks, "model_config"),
            (core_util.wrap_model, "model_config"),
        ],
        "forward_hook": [(core_util.set_hooks, "forward_hook_config")],
        "auxiliary_model_wrapper": [
            (model_wrapper.build_auxiliary_model_wrapper, "auxiliary_model_wrapper_config"),
            (model_util.redesign_model, "model_config"),
        ],
        "data_loader": [
            (data_util.build_data_loader, "data_loader_config"),
            (data_util.build_data_loaders, "data_loader_config"),
        ],
        "sampler": [(data_util.build_data_loader, "sampler_config")],
        "optimizer": [(DistillationBox.setup, "optim_config"), (TrainingBox.setup, "optim_config")],
        "scheduler": [(DistillationBox.setup, "scheduler_config"), (TrainingBox.setup, "scheduler_config")],
        "criterion": [
            (DistillationBox.setup_loss, "criterion_config"),
            (loss_registry.get_high_level_loss, "criterion_config"),
        ],
        "sub_term": [(high_level.AbstractLoss.__init__, "loss_config")],
        "sub_criterion": [(loss_registry.get_mid_level_loss, "mid_level_criterion_config")],
        "criterion_wrapper": [(loss_registry.get_loss_wrapper, "criterion_wrapper_config")],
        "simple_wrapper": [(mid_level.SimpleLossWrapper.__init__, "kwargs")],
        "simple_wrapper_input": [(mid_level.SimpleLossWrapper.__init__, "input_config")],
        "simple_wrapper_target": [(mid_level.SimpleLossWrapper.__init__, "target_config")],
    }
    sections = {}
    for section, functions in readers.items():
        keys = frozenset().union(*(keys_read(function, name) for function, name in functions))
        if not keys:
            raise RuntimeError(
                f"torchdistill {getattr(torchdistill, '__version__', '?')} no longer reads the recipe's "
                f"{section} section where this project looks for it; update imagenet/config.py"
            )
        sections[section] = keys
    return sections


LOADERS = ("torchvision", "dali")
RUNTIME_SCHEMA = {
    "fast": (bool, None),
    "loader": (str, (lambda v: v in LOADERS, " or ".join(LOADERS))),
    "fast_loader": (bool, None),
}
OPTIMIZER_VALUES = {
    "lr": (float, (lambda v: v > 0, "> 0")),
    "momentum": (float, (lambda v: 0 <= v < 1, "in [0, 1)")),
    "weight_decay": (float, (lambda v: v >= 0, ">= 0")),
}
LOADER_VALUES = {
    "batch_size": (int, (lambda v: v >= 1, ">= 1")),
    "num_workers": (int, (lambda v: v >= 0, ">= 0")),
}


def _keys(node: Any, allowed: set[str], where: str, source: str) -> dict:
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise UserError(f"{source}: {where} must be a mapping, got {node!r}")
    for key in node:
        if isinstance(key, str) and key.startswith("_"):
            continue
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            suggestion = f" (did you mean {where + '.' if where else ''}{hint[0]}?)" if hint else ""
            raise UserError(
                f"{source}: unknown key {where + '.' if where else ''}{key}{suggestion} — torchdistill "
                f"would silently ignore it"
            )
    return node


def _accepted_kwargs(target: Callable) -> set[str] | None:
    """Keyword names ``target`` accepts, following ``**kwargs`` up a class's MRO; None when anything goes."""
    classes = target.__mro__ if inspect.isclass(target) else (target,)
    names: set[str] = set()
    for cls in classes:
        function = cls.__init__ if inspect.isclass(target) else cls
        if function is object.__init__:
            break
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names - {"self"}
        if not inspect.isclass(target):
            return None
    return None


def _check_kwargs(target: Callable, kwargs: Any, where: str, source: str, supplied: set[str] = frozenset()) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, dict):
        raise UserError(f"{source}: {where} must be a mapping of keyword arguments, got {kwargs!r}")
    accepted = _accepted_kwargs(target)
    if accepted is None:
        return
    for key in kwargs:
        if key not in accepted or key in supplied:
            hint = difflib.get_close_matches(str(key), sorted(accepted - set(supplied)), n=1)
            suggestion = f" (did you mean {where}.{hint[0]}?)" if hint else ""
            raise UserError(
                f"{source}: {where}.{key} is not an argument of {getattr(target, '__name__', target)}{suggestion}"
            )


def _registered(registry: dict, key: Any, where: str, source: str, *more: dict) -> Callable:
    for table in (registry, *more):
        if key in table:
            return table[key]
    hint = difflib.get_close_matches(str(key), sorted(set(registry).union(*more)), n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise UserError(f"{source}: {where} = {key!r} is not registered in torchdistill{suggestion}")


def _number(value: Any, where: str, source: str, check: Callable[[float], bool], description: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
        raise UserError(f"{source}: {where} = {value!r} is out of range (must be {description})")


def _check_imports(recipe: dict, source: str) -> None:
    for node in _walk(recipe):
        if (
            isinstance(node, TaggedMap)
            and node.tag == "!import_call"
            and isinstance(node.get("key"), str)
            and node.get("key") != ENV_LOOKUP_KEY
        ):
            _keys(node, {"key", "package", "init"}, f"!import_call {node['key']}", source)
            try:
                target = main_util.import_get(node["key"], node.get("package"))
            except (ImportError, AttributeError, ValueError):
                raise UserError(f"{source}: !import_call key {node['key']!r} cannot be imported") from None
            init = _keys(node.get("init"), {"args", "kwargs"}, f"!import_call {node['key']}.init", source)
            _check_kwargs(target, init.get("kwargs"), f"{node['key']}.init.kwargs", source)


def _check_loader(loader: Any, where: str, source: str, datasets: dict, train: bool) -> None:
    loader = _keys(loader, torchdistill_keys()["data_loader"], where, source)
    if not loader:
        return
    if loader.get("dataset_id") not in datasets:
        raise UserError(
            f"{source}: {where}.dataset_id = {loader.get('dataset_id')!r} is not one of the datasets {sorted(datasets)}"
        )
    sampler = _keys(loader.get("sampler"), torchdistill_keys()["sampler"], f"{where}.sampler", source)
    sampler_kwargs = sampler.get("kwargs")
    if isinstance(sampler_kwargs, dict) and sampler_kwargs.get("seed") is not None:
        where_seed = f"{where}.sampler.kwargs.seed"
        _number(sampler_kwargs["seed"], where_seed, source, lambda v: v >= 0 and v == int(v), "an integer >= 0")
    kwargs = loader.get("kwargs") or {}
    _check_kwargs(
        torch.utils.data.DataLoader,
        kwargs,
        f"{where}.kwargs",
        source,
        supplied={"dataset", "sampler", "batch_sampler", "collate_fn"},
    )
    validate({k: v for k, v in kwargs.items() if k in LOADER_VALUES}, LOADER_VALUES, source=f"{source}: {where}.kwargs")
    batching, batching_where = kwargs, f"{where}.kwargs"
    batch_sampler = _keys(loader.get("batch_sampler"), {"key", "kwargs"}, f"{where}.batch_sampler", source)
    if batch_sampler:  # torchdistill then builds DataLoader(batch_sampler=<key>(sampler, **kwargs))
        batching, batching_where = batch_sampler.get("kwargs") or {}, f"{where}.batch_sampler.kwargs"
        batch_sampler_cls = _registered(
            BATCH_SAMPLER_DICT, batch_sampler.get("key"), f"{where}.batch_sampler.key", source
        )
        _check_kwargs(batch_sampler_cls, batching, batching_where, source, supplied={"sampler"})
        validate(
            {k: v for k, v in batching.items() if k in LOADER_VALUES},
            LOADER_VALUES,
            source=f"{source}: {batching_where}",
        )
    if train and batching.get("batch_size", 1) < 2:
        raise UserError(
            f"{source}: {batching_where}.batch_size = {batching.get('batch_size', 1)} — training needs at "
            f"least 2 images per batch per process (BatchNorm and the whitening use batch statistics)"
        )


def _check_side(side: Any, where: str, source: str) -> None:
    if isinstance(side, dict) and "src_ckpt" in side:
        raise UserError(
            f"{source}: {where}.src_ckpt would be loaded by torchdistill with unsafe unpickling — set "
            f"models.<teacher_model|student_model>.src_ckpt instead (loaded safely)"
        )
    keys = torchdistill_keys()
    side = _keys(side, keys["side"], where, source)
    _keys(side.get("forward_hook"), keys["forward_hook"], f"{where}.forward_hook", source)
    wrapper = _keys(
        side.get("auxiliary_model_wrapper"), keys["auxiliary_model_wrapper"], f"{where}.auxiliary_model_wrapper", source
    )
    if wrapper:
        target = _registered(
            AUXILIARY_MODEL_WRAPPER_DICT, wrapper.get("key"), f"{where}.auxiliary_model_wrapper.key", source
        )
        _check_kwargs(
            target, wrapper.get("kwargs"), f"{where}.auxiliary_model_wrapper.kwargs", source, supplied=WRAPPER_SUPPLIED
        )


def _check_criterion(criterion: Any, where: str, source: str) -> None:
    keys = torchdistill_keys()
    criterion = _keys(criterion, keys["criterion"], where, source)
    if not criterion:
        raise UserError(f"{source}: {where} is missing (torchdistill needs train.criterion)")
    loss_cls = _registered(HIGH_LEVEL_LOSS_DICT, criterion.get("key"), f"{where}.key", source)
    kwargs = criterion.get("kwargs") or {}
    _check_kwargs(loss_cls, kwargs, f"{where}.kwargs", source)
    _keys(kwargs.get("model_term"), {"weight"}, f"{where}.kwargs.model_term", source)
    for name, term in (kwargs.get("sub_terms") or {}).items():
        term_where = f"{where}.kwargs.sub_terms.{name}"
        term = _keys(term, keys["sub_term"], term_where, source)
        _number(term.get("weight"), f"{term_where}.weight", source, lambda v: True, "a finite number")
        sub = _keys(term.get("criterion"), keys["sub_criterion"], f"{term_where}.criterion", source)
        sub_cls = _registered(
            MIDDLE_LEVEL_LOSS_DICT,
            sub.get("key"),
            f"{term_where}.criterion.key",
            source,
            LOSS_DICT,
            LOW_LEVEL_LOSS_DICT,
        )
        _check_kwargs(sub_cls, sub.get("kwargs"), f"{term_where}.criterion.kwargs", source)
        wrapper = _keys(
            term.get("criterion_wrapper"), keys["criterion_wrapper"], f"{term_where}.criterion_wrapper", source
        )
        if wrapper:
            _registered(LOSS_WRAPPER_DICT, wrapper.get("key"), f"{term_where}.criterion_wrapper.key", source)
            wrapper_kwargs = _keys(
                wrapper.get("kwargs"), keys["simple_wrapper"], f"{term_where}.criterion_wrapper.kwargs", source
            )
            _keys(
                wrapper_kwargs.get("input"),
                keys["simple_wrapper_input"],
                f"{term_where}.criterion_wrapper.kwargs.input",
                source,
            )
            _keys(
                wrapper_kwargs.get("target"),
                keys["simple_wrapper_target"],
                f"{term_where}.criterion_wrapper.kwargs.target",
                source,
            )


def check_recipe(recipe: dict, source: str) -> None:
    """Reject unknown keys, unregistered names, arguments a class does not take and out-of-range values (naming the
    key) — everything torchdistill would ignore or only trip over mid-run; an infinite or NaN number anywhere is named
    first (:func:`projector_kd.engine.config.check_finite`)."""
    check_finite(recipe, source)
    _keys(recipe, TOP_KEYS, "", source)
    datasets = recipe.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise UserError(f"{source}: datasets must map dataset ids to datasets")
    models = _keys(recipe.get("models"), {"teacher_model", "student_model", "model"}, "models", source)
    if "student_model" not in models and "model" not in models:
        raise UserError(f"{source}: models.student_model is missing")
    for name, model in models.items():
        if isinstance(name, str) and name.startswith("_"):
            continue
        model = _keys(model, torchdistill_keys()["model"] | OWN_MODEL_KEYS, f"models.{name}", source)
        if not isinstance(model.get("key"), str):
            raise UserError(f"{source}: models.{name}.key must name a torchvision or torchdistill model")
    keys = torchdistill_keys()
    train = _keys(recipe.get("train"), keys["train"] | OWN_TRAIN_KEYS, "train", source)
    if train:
        _number(
            train.get("num_epochs"), "train.num_epochs", source, lambda v: v >= 1 and v == int(v), "an integer >= 1"
        )
        _number(train.get("log_freq", 1), "train.log_freq", source, lambda v: v >= 1, ">= 1")
        _check_loader(train.get("train_data_loader"), "train.train_data_loader", source, datasets, train=True)
        _check_loader(train.get("val_data_loader"), "train.val_data_loader", source, datasets, train=False)
        _check_side(train.get("teacher"), "train.teacher", source)
        _check_side(train.get("student"), "train.student", source)
        _check_side(train.get("model"), "train.model", source)
        optimizer = _keys(train.get("optimizer"), keys["optimizer"], "train.optimizer", source)
        optim_cls = _registered(OPTIM_DICT, optimizer.get("key"), "train.optimizer.key", source)
        _number(
            optimizer.get("grad_accum_step", 1),
            "train.optimizer.grad_accum_step",
            source,
            lambda v: v >= 1 and v == int(v),
            "an integer >= 1",
        )
        optim_kwargs = optimizer.get("kwargs") or {}
        _check_kwargs(optim_cls, optim_kwargs, "train.optimizer.kwargs", source, supplied={"params"})
        validate(
            {k: v for k, v in optim_kwargs.items() if k in OPTIMIZER_VALUES},
            OPTIMIZER_VALUES,
            source=f"{source}: train.optimizer.kwargs",
        )
        scheduler = _keys(train.get("scheduler"), keys["scheduler"], "train.scheduler", source)
        if scheduler:
            sched_cls = _registered(SCHEDULER_DICT, scheduler.get("key"), "train.scheduler.key", source)
            sched_kwargs = scheduler.get("kwargs") or {}
            _check_kwargs(sched_cls, sched_kwargs, "train.scheduler.kwargs", source, supplied={"optimizer"})
            milestones = sched_kwargs.get("milestones")
            if milestones is not None and (
                not isinstance(milestones, list)
                or not all(isinstance(m, int) and m > 0 for m in milestones)
                or milestones != sorted(set(milestones))
            ):
                raise UserError(
                    f"{source}: train.scheduler.kwargs.milestones = {milestones!r} must be increasing "
                    f"positive epoch numbers"
                )
            if "gamma" in sched_kwargs:
                _number(sched_kwargs["gamma"], "train.scheduler.kwargs.gamma", source, lambda v: v > 0, "> 0")
        _check_criterion(train.get("criterion"), "train.criterion", source)
    test = _keys(recipe.get("test"), {"test_data_loader", "log_freq"}, "test", source)
    _check_loader(test.get("test_data_loader"), "test.test_data_loader", source, datasets, train=False)
    validate(_keys(recipe.get("runtime"), RUNTIME_KEYS, "runtime", source), RUNTIME_SCHEMA, source=f"{source}: runtime")
    _check_imports(recipe, source)


def check_start_epoch(start_epoch: int, recipe: dict, source: str, trains: bool) -> None:
    """Refuse a ``--start_epoch`` that is negative, or (``trains``: the run trains) not below the recipe's
    ``train.num_epochs``: the run would train no epoch and then look for a best checkpoint that was never written."""
    if start_epoch < 0:
        raise UserError(f"--start_epoch {start_epoch} is negative — epochs are counted from 0")
    epochs = (recipe.get("train") or {}).get("num_epochs")
    if trains and isinstance(epochs, int) and start_epoch >= epochs:
        raise UserError(
            f"--start_epoch {start_epoch} is past the last epoch of {source} (train.num_epochs = {epochs}: epochs 0 "
            f"to {epochs - 1}), so there is nothing to train — pass a smaller --start_epoch or raise "
            f"train.num_epochs with --opts; to evaluate a checkpoint, pass -test_only"
        )
