"""Read and check a TF Serving ``ModelServerConfig`` text file (``serving/models.config``).

The same file configures the real ``tensorflow_model_server`` (production) and the dev server, so
it is parsed with the protos shipped in ``tensorflow-serving-api`` rather than a look-alike format.
Only the parts the dev server acts on are turned into ``ModelEntry`` values: name, base path,
version policy and version labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from lungtf.export import numeric_versions

POLICIES: tuple[str, ...] = ("latest", "all", "specific")


class ConfigError(ValueError):
    """A model server config that cannot be served, with every problem found."""


@dataclass(frozen=True)
class ModelEntry:
    """One served model.

    Attributes:
        name: the model name clients put in ``model_spec.name``.
        base_path: the folder holding integer version subfolders.
        policy: ``latest``, ``all`` or ``specific`` (TF Serving's ServableVersionPolicy).
        num_versions: how many of the newest versions ``latest`` keeps.
        versions: the versions ``specific`` serves.
        labels: version labels (``stable`` -> 1), resolvable in ``model_spec.version_label``.
        platform: ``model_platform``; only ``tensorflow`` SavedModels are served.
    """

    name: str
    base_path: Path
    policy: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: dict[str, int] = field(default_factory=dict)
    platform: str = "tensorflow"

    def wanted(self, available: list[int]) -> list[int]:
        """The versions to serve out of the ``available`` ones on disk, per the policy."""
        available = sorted(available)
        if self.policy == "all":
            return available
        if self.policy == "specific":
            return [v for v in available if v in self.versions]
        return available[-self.num_versions :] if available else []


def parse_config(path: str | Path) -> model_server_config_pb2.ModelServerConfig:
    """Parse a ModelServerConfig text proto.

    Raises:
        ConfigError: when the file is missing or is not a valid ModelServerConfig text proto.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model config file not found: {path}")
    try:
        return text_format.Parse(
            path.read_text(encoding="utf-8"), model_server_config_pb2.ModelServerConfig()
        )
    except text_format.ParseError as err:
        raise ConfigError(f"{path} is not a ModelServerConfig text proto: {err}") from None


def entries_from_proto(config: model_server_config_pb2.ModelServerConfig) -> list[ModelEntry]:
    """Turn the ``model_config_list`` of a parsed config into ``ModelEntry`` values."""
    entries = []
    for cfg in config.model_config_list.config:
        policy = cfg.model_version_policy.WhichOneof("policy_choice") or "latest"
        entries.append(
            ModelEntry(
                name=cfg.name,
                base_path=Path(cfg.base_path),
                policy=policy,
                num_versions=cfg.model_version_policy.latest.num_versions or 1,
                versions=tuple(cfg.model_version_policy.specific.versions),
                labels=dict(cfg.version_labels),
                platform=cfg.model_platform or "tensorflow",
            )
        )
    return entries


def check_entries(entries: list[ModelEntry], check_paths: bool = True) -> list[str]:
    """Every problem with ``entries``: names, platform, policy, paths, versions and labels.

    Args:
        entries: parsed models.
        check_paths: also check that base paths and the listed versions exist on disk.

    Returns:
        Human-readable problems; empty when the config can be served.
    """
    problems = []
    names = [e.name for e in entries]
    if not entries:
        problems.append("model_config_list has no config entries")
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(
            f"model name {name!r} appears {names.count(name)} times; names must be unique"
        )
    for e in entries:
        if not e.name:
            problems.append(f"a config entry with base_path {str(e.base_path)!r} has no name")
        if not str(e.base_path) or str(e.base_path) == ".":
            problems.append(f"model {e.name!r} has no base_path")
            continue
        if e.platform != "tensorflow":
            problems.append(f"model {e.name!r}: model_platform {e.platform!r}; only 'tensorflow'")
        if e.policy == "specific" and not e.versions:
            problems.append(f"model {e.name!r}: specific policy lists no versions")
        if not check_paths:
            continue
        if not e.base_path.is_dir():
            problems.append(f"model {e.name!r}: base_path {e.base_path} does not exist")
            continue
        on_disk = numeric_versions(e.base_path)
        missing = [v for v in e.versions if v not in on_disk] if e.policy == "specific" else []
        if missing:
            problems.append(
                f"model {e.name!r}: versions {missing} listed but not in {e.base_path} "
                f"(found {on_disk or 'no versions'})"
            )
        elif not on_disk:
            problems.append(f"model {e.name!r}: no numeric version folders in {e.base_path}")
        bad_labels = {k: v for k, v in e.labels.items() if v not in on_disk}
        if bad_labels:
            problems.append(
                f"model {e.name!r}: labels {bad_labels} point at versions not in {e.base_path} "
                f"(found {on_disk or 'no versions'})"
            )
    return problems


def load_config(path: str | Path, check_paths: bool = True) -> list[ModelEntry]:
    """Parse and check a models.config; the entries when it can be served.

    Raises:
        ConfigError: listing every problem found.
    """
    entries = entries_from_proto(parse_config(path))
    problems = check_entries(entries, check_paths)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return entries
