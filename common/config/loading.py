"""Reading a config: a YAML file over ``configs/default.yaml`` (``extends:`` chains
further files, paths relative to the file), then dotted overrides
(``training.lr=0.5``); errors name the file, or the override, and the dotted key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .experiment import ExperimentConfig, _typed, _with_old_meanings
from .sections import ConfigError
from .yaml_tree import DEFAULT_CONFIG, deep_merge, read_yaml


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load a YAML config over default.yaml (following ``extends``), apply ``key=value`` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    tree = _load_yaml_tree(path, seen=())
    if path.resolve() != DEFAULT_CONFIG.resolve():
        tree = deep_merge(read_yaml(DEFAULT_CONFIG), tree)
    if not overrides:
        cfg = _typed(tree, str(path))
    else:
        overridden = copy.deepcopy(tree)
        for item in overrides:
            apply_override(overridden, item)
        try:
            cfg = _typed(overridden, str(path))
        except ConfigError as exc:
            raise _blame_overrides(exc, tree, overridden, path, overrides) from None
    cfg.source = str(path)
    return cfg


def _blame_overrides(exc: ConfigError, tree: dict, overridden: dict, path: Path, overrides) -> ConfigError:
    """The same error, naming the override that caused it rather than the file (which is
    valid without the overrides); the file's own error if it is not."""
    try:
        _typed(tree, str(path))
    except ConfigError:
        return exc
    named = [o for o in overrides if f"'{o.partition('=')[0].strip()}'" in str(exc)]
    origin = f"override {named[0]!r}" if len(named) == 1 else "overrides " + ", ".join(repr(o) for o in overrides)
    try:
        _typed(overridden, origin)
    except ConfigError as again:
        return again
    return exc


def _own_meanings(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """What a file's silence means. A file with its own variable table but no
    ``features.select`` reads its whole table (not default.yaml's selection of another
    table). A run folder's resolved config.yaml (it has ``source``) written before a key
    existed keeps the meaning the key's absence had then (MEANING_WHEN_ABSENT)."""
    if path.resolve() == DEFAULT_CONFIG.resolve():
        return data
    if "source" in data:
        data = _with_old_meanings(data)
    features = data.get("features")
    if isinstance(features, dict) and "variables" in features and "select" not in features:
        data = {**data, "features": {**features, "select": []}}
    return data


def _load_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    data = _own_meanings(read_yaml(path), path)
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    return deep_merge(_load_yaml_tree(path.parent / str(base_name), seen + (path.resolve(),)), data)


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or not parts:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    try:
        # `key=` (nothing after it) is the empty text, as a shell user means it: YAML would
        # read null, which no key accepts (model.init_from= clears the start)
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override_string(text: str) -> list[str]:
    """Split the run-config ``set`` string ("a.b=1 c.d=x") into overrides."""
    return [tok for tok in text.split() if tok]



def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """The experiment config of Flower's run config (``pyproject.toml``'s
    ``[tool.flwr.app.config]`` keys and ``--run-config``): the coordinator's, and in a
    simulation the simulated hospitals' own (they are defined by the same launch)."""
    from ..paths import resolve

    name = str(run_config.get("config-file", "configs/default.yaml"))
    path = Path(name)
    if not path.is_absolute():
        # The app folder Flower installed (it holds configs/), then the project folder.
        here = DEFAULT_CONFIG.parent.parent / path
        path = here if here.is_file() else resolve(path)
    overrides = parse_override_string(str(run_config.get("set", "")))
    if str(run_config.get("data-path", "")):
        overrides.append(f"data.path={run_config['data-path']}")
    if str(run_config.get("outcomes-path", "")):
        overrides.append(f"data.outcomes={run_config['outcomes-path']}")
    if int(run_config.get("rounds", 0) or 0) > 0:
        overrides.append(f"run.rounds={int(run_config['rounds'])}")
    return load_config(path, overrides)
