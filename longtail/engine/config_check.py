"""Check a validated config against the registered components before anything is built or
written: every component name exists, every option key is one the component takes (with a
"did you mean" over the section's settings and the component's options), and components that
state an options model validate the values (ranges, types).

``core.config.validate`` checks the typed settings; the options of a component are the
component's to state, so they are checked here, where the registries are known.

:func:`prepare_config` is what a run starts with: the check, ``train.rescale_schedule`` applied
(every epoch-valued setting scaled from ``train.nominal_epochs`` to ``train.epochs`` with
:func:`longtail.core.scale.scale_epochs`, as ``longtail bench`` scales) and the warnings of
shortcuts that change the method (a schedule cut short, an imbalance factor that is not used);
:func:`data_warnings` adds those only the built data shows (a cap that flattens the imbalance, a
test split cut to a subset).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import numpy as np

from longtail.core.config import Config, component_sections, get_dotted
from longtail.core.errors import ConfigError, DataError
from longtail.core.registry import Registry
from longtail.core.scale import _EPOCH_KEY, _MILESTONE_KEY, _SECTIONS, scale_epochs, scaled_settings
from longtail.data import DataBundle
from longtail.data.build import parse_name
from longtail.data.samplers import SAMPLERS
from longtail.data.sources import LT_FOLDER_PREFIX, is_file_dataset
from longtail.engine.loggers import check_logger_config
from longtail.hooks import HOOKS
from longtail.losses import LOSSES
from longtail.methods import METHODS
from longtail.models import BACKBONES, HEADS, NECKS
from longtail.models.peft import TUNINGS
from longtail.optim import OPTIMIZERS, SCHEDULES

_FIX = "Fix the key in the YAML file or the override."
REGISTRIES: Dict[str, Registry] = {
    "loss": LOSSES,
    "optim": OPTIMIZERS,
    "schedule": SCHEDULES,
    "sampler": SAMPLERS,
    "method": METHODS,
}


def _unknown_key(key: str, section: str, candidates: Iterable[str], what: str) -> str:
    names = sorted(set(candidates))
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
    return f"unknown key '{section}.{key}'.{hint} The keys of {what}: {', '.join(names)}."


def _sections(cfg: Config) -> List[Tuple[str, Registry, str, Dict[str, Any], Set[str]]]:
    """(section, registry, component name, options, typed settings) of every component."""
    out = []
    models = component_sections()
    for section, registry in REGISTRIES.items():
        part = getattr(cfg, section)
        typed = set(models[section].model_fields) - {"name"}
        out.append((section, registry, part.name, part.params(), typed))
    for name, options in cfg.hooks.items():
        out.append((f"hooks.{name}", HOOKS, name, dict(options or {}), set()))
    return out


def option_accepted(cfg: Config, dotted: str) -> Optional[bool]:
    """Whether ``dotted`` (e.g. ``schedule.milestones``) is an option of the component ``cfg``
    chooses for that section; None when the key is no component option (a typed setting,
    another section, or a component that takes any key)."""
    for section, registry, name, options, typed in _sections(cfg):
        prefix = section + "."
        if not dotted.startswith(prefix) or name not in registry:
            continue
        key = dotted[len(prefix) :].split(".")[0]
        if key in typed or key == "name":
            return None
        accepted = registry.option_names(name, options)
        return None if accepted is None else key in accepted
    return None


def check_config(cfg: Config, where: str = "config") -> Config:
    """ConfigError naming the first bad component name or option of ``cfg``; returns ``cfg``."""
    problems = []
    for section, registry, name, options, typed in _sections(cfg):
        if name not in registry:
            close = difflib.get_close_matches(name, registry.names(), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            key = section if section.startswith("hooks.") else f"{section}.name"
            problems.append(
                f"'{key}': no {registry.kind} named {name!r}.{hint} Available: "
                f"{', '.join(registry.names())}."
            )
            continue
        accepted = registry.option_names(name, options)
        unknown = [] if accepted is None else [k for k in options if k not in accepted]
        for key in unknown:
            problems.append(
                _unknown_key(
                    key,
                    section,
                    typed | (accepted or set()),
                    f"{section} with {registry.kind} {name!r}",
                )
            )
        if not unknown:
            try:
                registry.check_options(name, options, section)
            except ConfigError as err:
                problems.append(str(err).removesuffix(_FIX).strip())
    problems += check_logger_config(cfg.train.logger, cfg.train.logger_params)
    if cfg.train.rescale_schedule and cfg.stages:
        problems.append(
            "'train.rescale_schedule': a pipeline's stages follow its train.epochs through their "
            "epochs_scale; set train.rescale_schedule=false and shorten the pipeline with "
            "train.epochs."
        )
    if problems:
        raise ConfigError(
            f"Invalid {where}: "
            + " ".join(problems)
            + " Fix the key in the YAML file or the key=value override."
        )
    return cfg


LISTED: Dict[str, Registry] = {
    **REGISTRIES,
    "hooks": HOOKS,
    "model.backbone": BACKBONES,
    "model.neck": NECKS,
    "model.head": HEADS,
    "model.tuning": TUNINGS,
}


def _summary(entry: Any) -> str:
    """The first sentence of the component's docstring (of its builder for a registered record)."""
    target = getattr(entry, "build", entry) if not isinstance(entry, type) else entry
    doc = inspect.getdoc(target) or inspect.getdoc(inspect.getmodule(target)) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    end = first.find(". ")
    return first if end < 0 else first[: end + 1]


def describe_components(section: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every registered component a config can name: its section, name, option keys (None: it
    takes any and checks them itself) and the first line of its docstring."""
    out = []
    for key, registry in LISTED.items():
        if section is not None and key != section and not key.startswith(section + "."):
            continue
        for name in registry.names():
            options = registry.option_names(name, {})
            out.append(
                {
                    "section": key,
                    "name": name,
                    "options": None if options is None else sorted(options),
                    "summary": _summary(registry.get(name)),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------
# a run's start: the schedule rescaled on request, and the shortcuts that change the method


def epoch_settings(cfg: Config) -> Dict[str, Any]:
    """``{dotted key: value}`` of every epoch-valued component option of ``cfg``: the keys
    :mod:`longtail.core.scale` rescales (``*_epoch``, ``*_epochs``, ``epochs``, ``*milestones``)."""
    tree = cfg.to_dict()
    sections = list(_SECTIONS) + [f"hooks.{name}" for name in tree.get("hooks") or {}]
    out: Dict[str, Any] = {}
    for section in sections:
        options = get_dotted(tree, section)
        if isinstance(options, dict):
            for key, value in options.items():
                if _EPOCH_KEY.search(key) or _MILESTONE_KEY.search(key):
                    out[f"{section}.{key}"] = value
    return out


def rescale_schedule(cfg: Config) -> Tuple[Config, Dict[str, Tuple[Any, Any]]]:
    """``cfg`` with ``train.rescale_schedule`` applied, and ``{key: (written, scaled)}``.

    The epoch-valued settings are read as written for ``train.nominal_epochs`` epochs and scaled
    to ``train.epochs`` exactly as ``longtail bench`` scales a suite's runs (``scale_epochs``);
    the result records ``rescale_schedule: false`` (done: a saved config.yaml is never scaled
    twice) beside ``nominal_epochs``."""
    t = cfg.train
    if not t.rescale_schedule:
        return cfg, {}
    if t.nominal_epochs is None:
        raise ConfigError(
            "train.rescale_schedule=true scales the schedule from the epochs the recipe is "
            "written for, but train.nominal_epochs is not set. Add train.nominal_epochs=N (the "
            "recipe's own train.epochs, e.g. 200 for the CIFAR recipes)."
        )
    written = cfg.model_copy(deep=True)
    written.train.epochs = t.nominal_epochs
    written.train.rescale_schedule = False
    if t.epochs == 0:  # a stage that trains nothing has no schedule to scale
        done = cfg.model_copy(deep=True)
        done.train.rescale_schedule = False
        return done, {}
    changes = scaled_settings(written, t.epochs)
    scaled = scale_epochs(written, t.epochs)
    assert isinstance(scaled, Config)
    return scaled, changes


def _shown(value: Any) -> str:
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def schedule_warnings(cfg: Config) -> List[str]:
    """Epoch-valued settings a run of ``train.epochs`` never reaches: a warm-up it never leaves, a
    phase it never starts (``loss.drw_epoch``, any ``*_epoch``), lr milestones it never passes.
    With ``train.nominal_epochs`` set, only settings inside the nominal schedule count."""
    epochs, nominal = cfg.train.epochs, cfg.train.nominal_epochs
    if epochs <= 0 or cfg.train.rescale_schedule:
        return []

    def cut(v: Any) -> bool:  # inside the schedule it was written for, outside this run's
        return 0 < v and v >= epochs and (nominal is None or v < nominal)

    found = []
    for key, value in epoch_settings(cfg).items():
        name = key.rsplit(".", 1)[-1]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and cut(value):
            if name.endswith("epochs"):  # a length: warmup_epochs, ...
                found.append(f"{key}={_shown(value)} spans the whole run (it is never left)")
            else:  # an epoch where a phase starts: drw_epoch, reweight_epoch, ...
                found.append(f"{key}={_shown(value)} is never reached (its phase never starts)")
        elif isinstance(value, list):
            missed = [v for v in value if isinstance(v, (int, float)) and cut(v)]
            if missed:
                found.append(
                    f"{key}={_shown(value)}: {', '.join(map(str, missed))} "
                    f"{'is' if len(missed) == 1 else 'are'} never reached (no lr step there)"
                )
    if not found:
        return []
    written = (
        f"the recipe's {nominal} epochs" if nominal else "the epochs the recipe is written for"
    )
    how = (
        f"train.rescale_schedule=true scales every epoch setting from {written} to {epochs}, as "
        f"`longtail bench` does"
        + ("" if nominal else " (with train.nominal_epochs=N, the recipe's train.epochs)")
    )
    if nominal:
        base = cfg.model_copy(deep=True)
        base.train.epochs = nominal
        planned = scaled_settings(base, epochs)
        shown = [
            f"{k} {_shown(a)} -> {_shown(b)}"
            for k, (a, b) in planned.items()
            if k != "train.epochs"
        ]
        if shown:
            how += f" ({'; '.join(shown)})"
    return [
        f"warning: with train.epochs={epochs}, "
        + "; ".join(found)
        + f". The method trained is not the recipe's. {how}; or set these keys yourself."
    ]


def uses_imbalance_factor(dataset: str) -> Optional[bool]:
    """Whether ``data.imbalance_factor`` shapes ``dataset``'s training set: the ``-lt`` built-in
    sets and ``folder-lt:`` trees; None for a name that is no dataset."""
    if is_file_dataset(dataset) or str(dataset).startswith(LT_FOLDER_PREFIX):
        return str(dataset).startswith(LT_FOLDER_PREFIX)
    try:
        return parse_name(dataset)[1]
    except DataError:
        return None


def config_warnings(cfg: Config) -> List[str]:
    """The shortcuts ``cfg`` alone shows: a schedule cut short, an imbalance factor given for a
    dataset that does not use one."""
    out = schedule_warnings(cfg)
    d = cfg.data
    if "imbalance_factor" in d.model_fields_set and uses_imbalance_factor(d.dataset) is False:
        out.append(
            f"warning: data.imbalance_factor={d.imbalance_factor:g} is not used: {d.dataset} is "
            f"not cut to a long-tailed subset (only the -lt built-in sets, e.g. "
            f"data.dataset=cifar10-lt, and folder-lt: trees are; a split-file benchmark's "
            f"imbalance is its files'). Choose such a dataset, or drop data.imbalance_factor."
        )
    return out


def prepare_config(cfg: Config, where: str = "config") -> Tuple[Config, List[str]]:
    """The config a run trains with and the lines to print at its start: ``check_config``, the
    warnings of :func:`config_warnings`, then ``train.rescale_schedule`` applied (with a note of
    what it scaled)."""
    check_config(cfg, where)
    notes = config_warnings(cfg)
    scaled, changes = rescale_schedule(cfg)
    if changes:
        listed = "; ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())
        notes.append(
            f"note: train.rescale_schedule: scaled from {cfg.train.nominal_epochs} epochs: {listed}."
        )
    return scaled, notes


def data_warnings(cfg: Config, data: DataBundle) -> List[str]:
    """The shortcuts only the built data shows: ``data.max_per_class`` cutting the largest
    classes (the imbalance it leaves), ``data.max_test_per_class`` evaluating on a subset."""
    d, out = cfg.data, []
    counts = [int(n) for n in data.class_counts]
    present = [n for n in counts if n > 0]
    cap = d.max_per_class
    if cap is not None and present:
        at_cap = sum(1 for n in counts if n >= cap)
        measured = max(present) / min(present)
        nominal = d.imbalance_factor if uses_imbalance_factor(d.dataset) else None
        if nominal is not None:  # the profile's factor, less the int rounding of the counts
            flattened = measured < 0.95 * nominal
            change = f"{measured:.3g} instead of {nominal:g} ({nominal / measured:.3g}x flatter)"
        else:  # no nominal factor: several classes at the cap were cut to it
            flattened = measured > 1 and at_cap >= 2
            change = f"{measured:.3g} (the images above {cap} of those classes are not used)"
        if flattened:
            out.append(
                f"warning: data.max_per_class={cap} cuts {at_cap} of {len(counts)} classes to "
                f"{cap} images: the training set's imbalance factor is {change}, and the "
                f"many-/medium-/few-shot groups and class-prior methods see that flatter "
                f"distribution. Keep it for smoke tests; drop data.max_per_class for the "
                f"method's real setting."
            )
    test_cap = d.max_test_per_class
    test = getattr(data, "test", None)
    if test_cap is not None and test is not None and len(test):
        # the cap keeps the first images of each class in file order: images were left out when
        # the kept positions in the official split leave a gap
        positions = np.asarray(test.indices)
        if int(positions.max()) + 1 > len(positions):
            out.append(
                f"warning: data.max_test_per_class={test_cap} evaluates on {len(test)} test "
                f"images (at most {test_cap} a class), a subset of the official test split: its "
                f"numbers are noisier and not comparable with published ones. Drop "
                f"data.max_test_per_class to evaluate on the whole test split."
            )
    return out
