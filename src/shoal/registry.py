"""Name -> implementation registries and the spec strings that select them.

Every pluggable part of shoal (datasets, models, tasks, strategies, codecs) is
registered under a name together with a pydantic model of its options. A
config names it with a spec string, ``"topk:ratio=0.01,memory=ef"``, or a
mapping, ``{name: topk, ratio: 0.01}``; the options are validated against that
implementation's own model, so a wrong option is an error before any process
starts. Datasets, models, codecs and tasks may also be a user's
``package.module:function`` entry point.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T")


class NoOptions(BaseModel):
    """Options model for an implementation that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Component:
    """A selected implementation and its validated options.

    ``target`` is the registered class or function, or a user's entry point.
    ``options`` is that implementation's pydantic model, or for an entry point
    the keyword arguments it will be called with.
    """

    name: str
    target: Callable[..., Any]
    options: Any = field(default_factory=dict)
    entry_point: bool = False

    def option_dict(self) -> dict[str, Any]:
        if isinstance(self.options, BaseModel):
            return self.options.model_dump()
        return dict(self.options)

    def to_config(self) -> str | dict[str, Any]:
        opts = self.option_dict()
        return {"name": self.name, **opts} if opts else self.name

    def spec(self) -> str:
        """The spec string, with only the options that differ from their defaults: ``topk:ratio=0.01``."""
        opts = self.options.model_dump(exclude_defaults=True) if isinstance(self.options, BaseModel) \
            else dict(self.options)
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else "")


@dataclass
class _Entry:
    target: Callable[..., Any]
    options: type[BaseModel]
    summary: str


class Registry(Generic[T]):
    """Implementations of one kind (``"codec"``, ``"model"``, ...) by name."""

    def __init__(self, kind: str, plural: str, home: str, *, also_home: tuple[str, ...] = (),
                 entry_points: bool = False, entry_point_needs: tuple[str, str] | None = None):
        self.kind = kind
        self.plural = plural
        self.homes = (home, *also_home)  # the packages whose modules register the built-in ones
        self.entry_points = entry_points
        # (attribute, what it means): what a user's entry point must have to be one of these.
        self.entry_point_needs = entry_point_needs
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, options: type[BaseModel] = NoOptions) -> Callable[[T], T]:
        def decorate(target: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = inspect.getdoc(target) or ""
            self._entries[name] = _Entry(target, options, doc.split("\n", 1)[0])  # type: ignore[arg-type]
            return target

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name in self.names():
            yield name, self._entries[name].summary

    def target(self, name: str) -> Any:
        """The registered class or function."""
        return self._entries[name].target

    def options_model(self, name: str) -> type[BaseModel]:
        return self._entries[name].options

    def resolve(self, spec: str | dict[str, Any] | Component) -> Component:
        """Parse a spec string or mapping into a validated :class:`Component`.

        Raises ``ValueError`` with a message naming the bad part and what is
        allowed.
        """
        if isinstance(spec, Component):
            return spec
        name, raw = parse_spec(spec)
        if name in self._entries:
            entry = self._entries[name]
            try:
                options = entry.options(**raw)
            except ValidationError as err:
                raise ValueError(f"{self.kind} {name!r}: {_first_error(err)}") from None
            return Component(name, entry.target, options)
        if self.entry_points and ":" in name:
            target = load_entry_point(name)
            if self.entry_point_needs and not hasattr(target, self.entry_point_needs[0]):
                raise ValueError(f"{self.kind} entry point {name!r} must be {self.entry_point_needs[1]}")
            # A class that names its options model (``Options``) gets them validated like a built-in's.
            model = getattr(target, "Options", None)
            if isinstance(model, type) and issubclass(model, BaseModel):
                try:
                    return Component(name, target, model(**raw), entry_point=True)
                except ValidationError as err:
                    raise ValueError(f"{self.kind} {name!r}: {_first_error(err)}") from None
            _check_call(name, target, raw)
            return Component(name, target, raw, entry_point=True)
        allowed = ", ".join(self.names())
        hint = " or a 'package.module:function' entry point" if self.entry_points else ""
        raise ValueError(f"unknown {self.kind} {name!r}; allowed: {allowed}{hint}")


def parse_spec(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` or ``{"name": ..., k: v}`` -> ``(name, {k: v})``.

    Values in strings are read as YAML scalars, so ``0.01`` is a float and
    ``true`` a bool. In ``pkg.mod:func`` what follows the colon is no
    ``key=value``, so it is read as an entry point and kept whole; options may
    follow it after a second colon: ``pkg.mod:func:width=64``.
    """
    if isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError("a mapping spec needs a 'name' key")
        rest = {k: v for k, v in spec.items() if k != "name"}
        return str(spec["name"]), rest
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"expected a name or 'name:key=value,...', got {spec!r}")
    spec = spec.strip()
    head, sep, tail = spec.partition(":")
    if sep and tail.strip() and "=" not in re.split("[:,]", tail, maxsplit=1)[0]:
        # module:function entry point, optionally followed by ":k=v,...".
        func, sep2, tail = tail.partition(":")
        head, sep = f"{head}:{func}", sep2
    options: dict[str, Any] = {}
    if sep and tail.strip():
        for item in split_top_level(tail):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad option {item!r} in {spec!r}; expected key=value")
            try:
                options[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
            except yaml.YAMLError:
                raise ValueError(f"bad value {value.strip()!r} for {key.strip()!r} in {spec!r}") from None
    return head, options


def split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``hidden=[64, 32],x=1`` is two items."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def load_entry_point(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"entry point {path!r} must look like 'package.module:function'")
    if module_name in ("__main__", "__mp_main__"):  # shoal.preload.workers_skip_main
        raise ValueError(f"entry point {path!r} names the running script, which shoal's workers do not import: "
                         f"move {attr!r} into a module of its own (e.g. mymodels.py) and name it 'mymodels:{attr}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"entry point {path!r}: cannot import {module_name!r} ({err})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"entry point {path!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"entry point {path!r} is not callable")
    return target


def _check_call(name: str, target: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"entry point {name!r} cannot take options {sorted(kwargs)}: {err}") from None
    except ValueError:  # builtins without a signature: accept
        pass


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


DATASETS: Registry[Any] = Registry("dataset", "datasets", "shoal.data", entry_points=True)
MODELS: Registry[Any] = Registry("model", "models", "shoal.models", entry_points=True)
STRATEGIES: Registry[Any] = Registry("strategy", "strategies", "shoal.strategies", also_home=("shoal.ps",))
CODECS: Registry[Any] = Registry("codec", "codecs", "shoal.comm.codecs", entry_points=True,
                                 entry_point_needs=("capabilities", "a shoal.comm.codecs.Codec subclass "
                                                    "(it declares `capabilities`)"))
FED_STRATEGIES: Registry[Any] = Registry("federated strategy", "federated strategies", "shoal.fl.strategies")
PARTITIONS: Registry[Any] = Registry("partition", "partitions", "shoal.data")
PRUNERS: Registry[Any] = Registry("pruner", "pruners", "shoal.compress")
QUANTIZERS: Registry[Any] = Registry("quantizer", "quantizers", "shoal.compress")
TASKS: Registry[Any] = Registry("task", "tasks", "shoal.tasks", entry_points=True,
                                entry_point_needs=("main_metric", "a shoal.tasks.Task subclass "
                                                   "(it declares `main_metric`)"))
PRIVACY: Registry[Any] = Registry("privacy mechanism", "privacy mechanisms", "shoal.privacy")
SECURE: Registry[Any] = Registry("secure aggregation", "secure aggregations", "shoal.fl.secure")
POLICIES: Registry[Any] = Registry("scheduling policy", "scheduling policies", "shoal.platform.policies")
# Parameter-server topologies that run another strategy's options (sync:backup=b):
# named by Strategy.topology, not listed by `shoal list` (a user names the strategy).
TOPOLOGIES: Registry[Any] = Registry("topology", "topologies", "shoal.ps")
ALL = (DATASETS, MODELS, TASKS, STRATEGIES, CODECS, FED_STRATEGIES, PARTITIONS, PRUNERS, QUANTIZERS, PRIVACY, SECURE, POLICIES)


_LOADED: set[str] = set()  # homes whose modules are all imported


def load_builtins(*registries: Registry[Any]) -> None:
    """Import the packages whose modules register shoal's own implementations
    (of the given registries; all when none are given: the training
    strategies pull in much of torch.distributed, which a federated client
    does not need)."""
    for registry in registries or ALL:
        for home in registry.homes:
            if home in _LOADED:  # validators call this for every spec: list each package once
                continue
            package = importlib.import_module(home)
            # Every module of the package: a new implementation is one file and its
            # decorator, and the package's __init__ need not import it (nor, through
            # it, everything else the package holds).
            for module in pkgutil.iter_modules(getattr(package, "__path__", [])):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{home}.{module.name}")
            _LOADED.add(home)
