"""One schema per estimator: its options dataclass.

An estimator's settings are the fields of its dataclass. Those a person may set are declared with
:func:`option`, which adds a one-line help, a label, a range and where the option shows up (the
app's flat round settings, a command-line flag); its type, choices and default are the field's own
(``block: int | Literal["auto"] = option(2, ...)`` takes a whole number or "auto"). From that one
declaration come the Train tab's widgets, the checks and the answer of ``/train_start``, the
command line's flags and the stored round settings (app/round_config.py, rlr_core/training/cli.py).
Fields declared with a plain default are internal knobs: code may pass them, nobody types them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

OPTION = "rlr_option"  # the dataclass field metadata key


class OptionError(ValueError):
    """A value an option does not take; the message is one line for the person who typed it."""


@dataclass(frozen=True)
class OptionSpec:
    """One settable option of one estimator."""

    name: str  # the dataclass field
    kind: type  # int, float, bool or str (a pair's items for count=2)
    default: Any
    help: str  # one line: the CLI flag's help, the Train tab widget's info
    label: str  # a few words: the widget's label, the subject of error messages
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()  # a str option's allowed values (from its Literal)
    words: tuple[str, ...] = ()  # strings a number option also takes (``Literal["auto"]``)
    optional: bool = False  # None is allowed (the estimator then decides)
    count: int = 1  # 2: a pair of numbers
    public: str | None = None  # its key in the app's flat round settings (None: not there)
    flag: str = ""  # the command-line flag, "--" + this
    chain_steps: bool = False  # a number of sampling steps: never more than the chain has
    implicit: bool = False  # left out of the stored options at its default (older rounds lack it)
    examples: tuple[Any, ...] = ()  # suggestions for a widget (block lengths to pick from)

    def describe(self) -> str:
        """What the value must be, for error messages ("a whole number from 1 to 200 or auto")."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.kind is bool:
            return "true or false"
        what = "a whole number" if self.kind is int else "a number"
        if self.count == 2:
            what = f"two {what[2:]}s" if self.kind is int else "two numbers"
        if self.low is not None and self.high is not None:
            what += f" from {self.low:g} to {self.high:g}"
        elif self.low is not None:
            what += f" of at least {self.low:g}"
        elif self.high is not None:
            what += f" of at most {self.high:g}"
        return what + "".join(f" or {w}" for w in self.words)

    def check(self, value: Any) -> Any:
        """``value`` as this option takes it (numbers from numeric text, "auto" from " Auto "), or
        :class:`OptionError` with a one-line message."""
        if self.optional and (value is None or value == ""):
            return None
        if self.choices:
            if value not in self.choices:
                raise OptionError(f"{self.label} must be {self.describe()}; got {value!r}")
            return value
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{self.label} must be {self.describe()}, got {value!r}")
            return value
        if self.count == 2:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 2:
                raise OptionError(f"{self.label} must be {self.describe()}, got {value!r}")
            return tuple(self._number(v, value) for v in value)
        return self._number(value, value)

    def _number(self, value: Any, shown: Any) -> int | float:
        message = f"{self.label} must be {self.describe()}, got {shown!r}"
        if isinstance(value, bool) or value is None or value == "":
            raise OptionError(message)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise OptionError(message) from None
        if not math.isfinite(number) or (self.kind is int and number != int(number)):
            raise OptionError(message)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise OptionError(message)
        return int(number) if self.kind is int else number


def option(default: Any, *, help: str, label: str, low: float | None = None, high: float | None = None,
           public: bool | str = False, flag: str | None = None, chain_steps: bool = False,
           implicit: bool = False, examples: tuple[Any, ...] = ()) -> Any:
    """A dataclass field that is a settable option (see the module doc). ``public``: True puts it in
    the app's round settings under its field name, a string under that name; ``flag``: the
    command-line flag without "--" (default: the field's name with dashes)."""
    meta = {"help": help, "label": label, "low": low, "high": high, "public": public, "flag": flag,
            "chain_steps": chain_steps, "implicit": implicit, "examples": tuple(examples)}
    return dataclasses.field(default=default, metadata={OPTION: meta})


def _type_of(hint: Any) -> tuple[type, tuple[str, ...], bool, int]:
    """(kind, literal strings, optional, count) of a field's annotation."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds: list[type] = []
    literals: list[str] = []
    count = 1
    for arg in (a for a in args if a is not type(None)):
        if typing.get_origin(arg) is Literal:
            literals.extend(typing.get_args(arg))
        elif typing.get_origin(arg) is tuple:
            items = typing.get_args(arg)
            kinds.append(items[0])
            count = len(items)
        else:
            kinds.append(arg)
    if len(kinds) > 1 or (kinds and kinds[0] not in (int, float, bool)):
        raise TypeError(f"an option must be a number, a bool or a Literal of strings, not {hint!r}")
    return (kinds[0] if kinds else str), tuple(literals), optional, count


@functools.cache
def options_schema(cls: type) -> tuple[OptionSpec, ...]:
    """The settable options of an estimator class, in field order (its dataclass is the schema)."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(OPTION)
        if meta is None:
            continue
        kind, literals, optional, count = _type_of(hints[f.name])
        public = meta["public"]
        specs.append(OptionSpec(
            name=f.name, kind=kind, default=f.default, help=meta["help"], label=meta["label"],
            low=meta["low"], high=meta["high"], choices=literals if kind is str else (),
            words=literals if kind is not str else (), optional=optional, count=count,
            public=(f.name if public is True else public) or None,
            flag=meta["flag"] or f.name.replace("_", "-"), chain_steps=meta["chain_steps"],
            implicit=meta["implicit"], examples=meta["examples"]))
    return tuple(specs)


def parse_options(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` checked against ``cls``'s schema: every value of the right type and range, no
    unknown name (:class:`OptionError` otherwise). Internal fields are not settable here."""
    specs = {s.name: s for s in options_schema(cls)}
    unknown = sorted(str(k) for k in raw if k not in specs)
    if unknown:
        raise OptionError(f"{getattr(cls, 'name', cls.__name__)} takes no option {', '.join(unknown)}; "
                          f"its options are {', '.join(specs)}")
    return {k: specs[k].check(v) for k, v in raw.items()}


def takes(cls: type, name: str) -> bool:
    """Whether the estimator class has option (or field) ``name``: a capability the app asks about
    (``takes(cls, "window")``: it can draw its block inside a DCoT stage)."""
    return any(f.name == name for f in dataclasses.fields(cls))


def public_options(classes: typing.Iterable[type]) -> dict[str, tuple[OptionSpec, tuple[str, ...]]]:
    """The app's flat estimator settings: public key -> (its spec, the estimators that take it),
    in the order they first appear. An option several estimators take must be declared alike."""
    out: dict[str, tuple[OptionSpec, tuple[str, ...]]] = {}
    for cls in classes:
        for spec in options_schema(cls):
            if spec.public is None:
                continue
            if spec.public in out:
                first, names = out[spec.public]
                if dataclasses.replace(spec, name=first.name) != first:
                    raise TypeError(f"option {spec.public!r} is declared differently by {cls.name} and {names[0]}")
                out[spec.public] = (first, (*names, cls.name))
            else:
                out[spec.public] = (spec, (cls.name,))
    return out


def from_public(cls: type, values: Mapping[str, Any], chain_steps: int) -> dict[str, Any]:
    """``cls``'s options from checked flat round settings (the public keys it takes); a number of
    sampling steps is cut to the chain's ``chain_steps``; implicit options at their default are left out."""
    options = {}
    for spec in options_schema(cls):
        if spec.public is None or spec.public not in values:
            continue
        value = values[spec.public]
        options[spec.name] = min(value, chain_steps) if spec.chain_steps and isinstance(value, int) else value
    return drop_implicit(cls, options)


def drop_implicit(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without the implicit ones at their default (as rounds have always stored them)."""
    implicit = {s.name: s.default for s in options_schema(cls) if s.implicit}
    return {k: v for k, v in options.items() if not (k in implicit and v == implicit[k])}


def to_public(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """The flat round settings of ``cls``'s public options (what :func:`from_public` read)."""
    return {s.public: options.get(s.name, s.default) for s in options_schema(cls) if s.public is not None}
