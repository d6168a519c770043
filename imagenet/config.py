"""torchdistill 1.x YAML recipes, read in two phases so every mistake is caught before any work.

Phase 1 (:func:`load_recipe`) parses the file with torchdistill's tags (``!import_call``, ``!join``, ...) kept as
inert :class:`Tagged` nodes, so ``--opts`` overrides, ``--data-root`` and :func:`check_recipe` see the whole recipe
without importing data or building anything. Phase 2 (:func:`resolve`) evaluates the tags exactly as torchdistill's
``yaml_util.load_yaml_file`` would (same functions from ``torchdistill.common.main_util``).

Data root: the recipes read it as ``!import_call {key: os.getenv, init: {args: [<VAR>, <default>]}}``, so plain
torchdistill honours the environment variable too; ``--data-root`` replaces every such node's value.
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torchdistill.common import main_util
from torchdistill.core import distillation, training  # noqa: F401  (fills torchdistill's registries)
from torchdistill.losses.registry import (HIGH_LEVEL_LOSS_DICT, LOSS_DICT, LOSS_WRAPPER_DICT, LOW_LEVEL_LOSS_DICT,
                                          MIDDLE_LEVEL_LOSS_DICT)
from torchdistill.models.registry import AUXILIARY_MODEL_WRAPPER_DICT
from torchdistill.optim.registry import OPTIM_DICT, SCHEDULER_DICT

import imagenet.registry  # noqa: F401  (this project's names)
from projector_kd.config import load_yaml, validate
from projector_kd.errors import UserError

MAPPING_TAGS = ("!import_get", "!import_call", "!import_call_method", "!call_method", "!access_by_index_or_key")
SEQUENCE_TAGS = ("!join", "!pathjoin", "!getattr", "!setattr")
SCALAR_TAGS = ("!expanduser", "!abspath")
ENV_LOOKUP_KEY = "os.getenv"


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
    def __new__(cls, tag: str, value: str) -> "TaggedStr":
        obj = super().__new__(cls, value)
        obj.tag = tag
        return obj


class _RecipeLoader(yaml.SafeLoader):
    pass


def _construct(loader: _RecipeLoader, node: yaml.Node) -> Tagged:
    if isinstance(node, yaml.MappingNode) and node.tag in MAPPING_TAGS:
        return TaggedMap(node.tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode) and node.tag in SEQUENCE_TAGS:
        return TaggedSeq(node.tag, loader.construct_sequence(node, deep=True))
    if isinstance(node, yaml.ScalarNode) and node.tag in SCALAR_TAGS:
        return TaggedStr(node.tag, loader.construct_scalar(node))
    raise yaml.constructor.ConstructorError(None, None, f"tag {node.tag} is not allowed on a {node.id}", node.start_mark)


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


def load_recipe(path: str | os.PathLike) -> dict:
    """Parse a torchdistill recipe with its tags kept inert (phase 1)."""
    return load_yaml(path, loader=_RecipeLoader, missing_hint=" — pass --config with a path relative to the working "
                                                              "directory or to the repository root")


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
    return [node for node in _walk(recipe) if isinstance(node, TaggedMap) and node.tag == "!import_call"
            and node.get("key") == ENV_LOOKUP_KEY]


def set_data_root(recipe: dict, root: str) -> None:
    """Point every ``os.getenv`` data-root lookup of the recipe at ``root`` (the ``--data-root`` flag)."""
    lookups = env_lookups(recipe)
    if not lookups:
        raise UserError("--data-root: this config has no `!import_call {key: os.getenv, ...}` data-root entry; "
                        "edit its dataset paths instead")
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
# The keys torchdistill 1.1 (and this entry point) read; any other key would be silently ignored, so it is an error.
# Keys starting with '_' are free (YAML anchors live there, as in torchdistill's own recipes).

TOP_KEYS = {"dependencies", "datasets", "models", "train", "test", "runtime"}
MODEL_KEYS = {"key", "kwargs", "src_ckpt", "dst_ckpt", "repo_or_dir", "quantized", "sync_bn"}
TRAIN_KEYS = {"log_freq", "num_epochs", "train_data_loader", "val_data_loader", "teacher", "student", "model",
              "optimizer", "scheduler", "criterion"}
SIDE_KEYS = {"forward_proc", "sequential", "auxiliary_model_wrapper", "frozen_modules", "forward_hook", "wrapper",
             "requires_grad", "adaptations"}
WRAPPER_KEYS = {"key", "kwargs", "sequential", "frozen_modules", "adaptations"}
LOADER_KEYS = {"dataset_id", "sampler", "batch_sampler", "collate_fn", "kwargs", "requires_supp", "dataset_wrapper"}
OPTIMIZER_KEYS = {"key", "kwargs", "module_wise_configs", "filters_params", "max_grad_norm", "grad_accum_step"}
SCHEDULER_KEYS = {"key", "kwargs", "scheduling_step"}
CRITERION_KEYS = {"key", "kwargs", "args", "func2extract_model_loss"}
TERM_KEYS = {"criterion", "criterion_wrapper", "weight"}
RUNTIME_KEYS = {"fast", "loader"}
WRAPPER_SUPPLIED = {"device", "device_ids", "distributed", "teacher_model", "student_model"}

LOADERS = ("torchvision", "dali")
RUNTIME_SCHEMA = {"fast": (bool, None), "loader": (str, (lambda v: v in LOADERS, " or ".join(LOADERS)))}
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
            raise UserError(f"{source}: unknown key {where + '.' if where else ''}{key}{suggestion} — torchdistill "
                            f"would silently ignore it")
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
            raise UserError(f"{source}: {where}.{key} is not an argument of {getattr(target, '__name__', target)}"
                            f"{suggestion}")


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
        if isinstance(node, TaggedMap) and node.tag == "!import_call" and isinstance(node.get("key"), str) \
                and node.get("key") != ENV_LOOKUP_KEY:
            _keys(node, {"key", "package", "init"}, f"!import_call {node['key']}", source)
            try:
                target = main_util.import_get(node["key"], node.get("package"))
            except (ImportError, AttributeError, ValueError):
                raise UserError(f"{source}: !import_call key {node['key']!r} cannot be imported") from None
            init = _keys(node.get("init"), {"args", "kwargs"}, f"!import_call {node['key']}.init", source)
            _check_kwargs(target, init.get("kwargs"), f"{node['key']}.init.kwargs", source)


def _check_loader(loader: Any, where: str, source: str, datasets: dict, train: bool) -> None:
    loader = _keys(loader, LOADER_KEYS, where, source)
    if not loader:
        return
    if loader.get("dataset_id") not in datasets:
        raise UserError(f"{source}: {where}.dataset_id = {loader.get('dataset_id')!r} is not one of the datasets "
                        f"{sorted(datasets)}")
    _keys(loader.get("sampler"), {"class_or_func", "kwargs"}, f"{where}.sampler", source)
    kwargs = loader.get("kwargs") or {}
    _check_kwargs(torch.utils.data.DataLoader, kwargs, f"{where}.kwargs", source,
                  supplied={"dataset", "sampler", "batch_sampler", "collate_fn"})
    validate({k: v for k, v in kwargs.items() if k in LOADER_VALUES}, LOADER_VALUES, source=f"{source}: {where}.kwargs")
    if train and kwargs.get("batch_size", 1) < 2:
        raise UserError(f"{source}: {where}.kwargs.batch_size = {kwargs.get('batch_size', 1)} — training needs at "
                        f"least 2 images per batch per process (BatchNorm and the whitening use batch statistics)")


def _check_side(side: Any, where: str, source: str) -> None:
    if isinstance(side, dict) and "src_ckpt" in side:
        raise UserError(f"{source}: {where}.src_ckpt would be loaded by torchdistill with unsafe unpickling — set "
                        f"models.<teacher_model|student_model>.src_ckpt instead (loaded safely)")
    side = _keys(side, SIDE_KEYS, where, source)
    _keys(side.get("forward_hook"), {"input", "output"}, f"{where}.forward_hook", source)
    wrapper = _keys(side.get("auxiliary_model_wrapper"), WRAPPER_KEYS, f"{where}.auxiliary_model_wrapper", source)
    if wrapper:
        target = _registered(AUXILIARY_MODEL_WRAPPER_DICT, wrapper.get("key"), f"{where}.auxiliary_model_wrapper.key",
                             source)
        _check_kwargs(target, wrapper.get("kwargs"), f"{where}.auxiliary_model_wrapper.kwargs", source,
                      supplied=WRAPPER_SUPPLIED)


def _check_criterion(criterion: Any, where: str, source: str) -> None:
    criterion = _keys(criterion, CRITERION_KEYS, where, source)
    if not criterion:
        raise UserError(f"{source}: {where} is missing (torchdistill needs train.criterion)")
    loss_cls = _registered(HIGH_LEVEL_LOSS_DICT, criterion.get("key"), f"{where}.key", source)
    kwargs = criterion.get("kwargs") or {}
    _check_kwargs(loss_cls, kwargs, f"{where}.kwargs", source)
    _keys(kwargs.get("model_term"), {"weight"}, f"{where}.kwargs.model_term", source)
    for name, term in (kwargs.get("sub_terms") or {}).items():
        term_where = f"{where}.kwargs.sub_terms.{name}"
        term = _keys(term, TERM_KEYS, term_where, source)
        _number(term.get("weight"), f"{term_where}.weight", source, lambda v: True, "a finite number")
        sub = _keys(term.get("criterion"), {"key", "kwargs"}, f"{term_where}.criterion", source)
        sub_cls = _registered(MIDDLE_LEVEL_LOSS_DICT, sub.get("key"), f"{term_where}.criterion.key", source,
                              LOSS_DICT, LOW_LEVEL_LOSS_DICT)
        _check_kwargs(sub_cls, sub.get("kwargs"), f"{term_where}.criterion.kwargs", source)
        wrapper = _keys(term.get("criterion_wrapper"), {"key", "kwargs", "args"}, f"{term_where}.criterion_wrapper",
                        source)
        if wrapper:
            _registered(LOSS_WRAPPER_DICT, wrapper.get("key"), f"{term_where}.criterion_wrapper.key", source)
            wrapper_kwargs = _keys(wrapper.get("kwargs"), {"input", "target"},
                                   f"{term_where}.criterion_wrapper.kwargs", source)
            _keys(wrapper_kwargs.get("input"), {"is_from_teacher", "module_path", "io"},
                  f"{term_where}.criterion_wrapper.kwargs.input", source)
            _keys(wrapper_kwargs.get("target"), {"uses_label", "is_from_teacher", "module_path", "io"},
                  f"{term_where}.criterion_wrapper.kwargs.target", source)


def check_recipe(recipe: dict, source: str) -> None:
    """Reject unknown keys, unregistered names, arguments a class does not take and out-of-range values (naming the
    key) — everything torchdistill would ignore or only trip over mid-run."""
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
        model = _keys(model, MODEL_KEYS, f"models.{name}", source)
        if not isinstance(model.get("key"), str):
            raise UserError(f"{source}: models.{name}.key must name a torchvision or torchdistill model")
    train = _keys(recipe.get("train"), TRAIN_KEYS, "train", source)
    if train:
        _number(train.get("num_epochs"), "train.num_epochs", source, lambda v: v >= 1 and v == int(v),
                "an integer >= 1")
        _number(train.get("log_freq", 1), "train.log_freq", source, lambda v: v >= 1, ">= 1")
        _check_loader(train.get("train_data_loader"), "train.train_data_loader", source, datasets, train=True)
        _check_loader(train.get("val_data_loader"), "train.val_data_loader", source, datasets, train=False)
        _check_side(train.get("teacher"), "train.teacher", source)
        _check_side(train.get("student"), "train.student", source)
        _check_side(train.get("model"), "train.model", source)
        optimizer = _keys(train.get("optimizer"), OPTIMIZER_KEYS, "train.optimizer", source)
        optim_cls = _registered(OPTIM_DICT, optimizer.get("key"), "train.optimizer.key", source)
        _number(optimizer.get("grad_accum_step", 1), "train.optimizer.grad_accum_step", source,
                lambda v: v >= 1 and v == int(v), "an integer >= 1")
        optim_kwargs = optimizer.get("kwargs") or {}
        _check_kwargs(optim_cls, optim_kwargs, "train.optimizer.kwargs", source, supplied={"params"})
        validate({k: v for k, v in optim_kwargs.items() if k in OPTIMIZER_VALUES}, OPTIMIZER_VALUES,
                 source=f"{source}: train.optimizer.kwargs")
        scheduler = _keys(train.get("scheduler"), SCHEDULER_KEYS, "train.scheduler", source)
        if scheduler:
            sched_cls = _registered(SCHEDULER_DICT, scheduler.get("key"), "train.scheduler.key", source)
            sched_kwargs = scheduler.get("kwargs") or {}
            _check_kwargs(sched_cls, sched_kwargs, "train.scheduler.kwargs", source, supplied={"optimizer"})
            milestones = sched_kwargs.get("milestones")
            if milestones is not None and (not isinstance(milestones, list) or not all(
                    isinstance(m, int) and m > 0 for m in milestones) or milestones != sorted(set(milestones))):
                raise UserError(f"{source}: train.scheduler.kwargs.milestones = {milestones!r} must be increasing "
                                f"positive epoch numbers")
            if "gamma" in sched_kwargs:
                _number(sched_kwargs["gamma"], "train.scheduler.kwargs.gamma", source, lambda v: v > 0, "> 0")
        _check_criterion(train.get("criterion"), "train.criterion", source)
    test = _keys(recipe.get("test"), {"test_data_loader", "log_freq"}, "test", source)
    _check_loader(test.get("test_data_loader"), "test.test_data_loader", source, datasets, train=False)
    validate(_keys(recipe.get("runtime"), RUNTIME_KEYS, "runtime", source), RUNTIME_SCHEMA, source=f"{source}: runtime")
    _check_imports(recipe, source)
